/**
 * Netlink, generic-netlink controller and kernel NBD family constants, named as in the UAPI
 * headers (`linux/netlink.h`, `linux/genetlink.h`, `linux/nbd-netlink.h`, `linux/nbd.h`).
 * `test/unit/netlink-constants.test.ts` checks them against the installed headers.
 */

export const AF_NETLINK = 16;
export const NETLINK_GENERIC = 16;
export const SOL_NETLINK = 270;

/** setsockopt options at SOL_NETLINK. */
export const NETLINK_SOCKOPT = {
  ADD_MEMBERSHIP: 1,
  DROP_MEMBERSHIP: 2,
  CAP_ACK: 10,
  EXT_ACK: 11,
} as const;

/** struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid. */
export const NLMSG_HDRLEN = 16;
/** struct nlattr: u16 len, u16 type. */
export const NLA_HDRLEN = 4;
/** Messages and attributes start on 4-byte boundaries. */
export const NL_ALIGNTO = 4;

/** Reserved nlmsghdr types (control messages). */
export const NLMSG = {
  NOOP: 1,
  ERROR: 2,
  DONE: 3,
  OVERRUN: 4,
} as const;

export const NLM_F = {
  REQUEST: 0x01,
  MULTI: 0x02,
  ACK: 0x04,
  ECHO: 0x08,
  DUMP: 0x300,
  /** In an NLMSG_ERROR: the echoed request was cut to its header. */
  CAPPED: 0x100,
  /** In an NLMSG_ERROR: extended-ack TLVs follow the echoed request. */
  ACK_TLVS: 0x200,
} as const;

/** Extended-ack TLVs carried by NLMSG_ERROR (linux/netlink.h `enum nlmsgerr_attrs`). */
export const NLMSGERR_ATTR = {
  MSG: 1,
  OFFS: 2,
} as const;

export const NLA_F_NESTED = 0x8000;
export const NLA_F_NET_BYTEORDER = 0x4000;
export const NLA_TYPE_MASK = 0x3fff;

/** struct genlmsghdr: u8 cmd, u8 version, u16 reserved. */
export const GENL_HDRLEN = 4;

/** The controller family (nlctrl) has this fixed id. */
export const GENL_ID_CTRL = 0x10;
export const CTRL_CMD = {
  NEWFAMILY: 1,
  GETFAMILY: 3,
} as const;
export const CTRL_ATTR = {
  FAMILY_ID: 1,
  FAMILY_NAME: 2,
  MCAST_GROUPS: 7,
} as const;
export const CTRL_ATTR_MCAST_GRP = {
  NAME: 1,
  ID: 2,
} as const;

/* ------------------------------------------------------------------ nbd family */

export const NBD_GENL_FAMILY_NAME = 'nbd';
export const NBD_GENL_VERSION = 1;
export const NBD_GENL_MCAST_GROUP_NAME = 'nbd_mc_group';

/** Generic-netlink commands of the kernel nbd family (NBD_CMD_* in linux/nbd-netlink.h; not the wire's NBD_CMD). */
export const NBD_GENL_CMD = {
  CONNECT: 1,
  DISCONNECT: 2,
  RECONFIGURE: 3,
  LINK_DEAD: 4,
  STATUS: 5,
} as const;

export const NBD_ATTR = {
  INDEX: 1,
  SIZE_BYTES: 2,
  BLOCK_SIZE_BYTES: 3,
  TIMEOUT: 4,
  SERVER_FLAGS: 5,
  CLIENT_FLAGS: 6,
  SOCKETS: 7,
  DEAD_CONN_TIMEOUT: 8,
  DEVICE_LIST: 9,
  BACKEND_IDENTIFIER: 10,
} as const;

/** Inside NBD_ATTR_SOCKETS: repeated NBD_SOCK_ITEM, each holding one NBD_SOCK_FD. */
export const NBD_SOCK_ITEM = 1;
export const NBD_SOCK_FD = 1;

/** Inside NBD_ATTR_DEVICE_LIST: repeated NBD_DEVICE_ITEM, each with INDEX and CONNECTED. */
export const NBD_DEVICE_ITEM = 1;
export const NBD_DEVICE = {
  INDEX: 1,
  CONNECTED: 2,
} as const;

/** NBD_ATTR_CLIENT_FLAGS bits (linux/nbd.h). */
export const NBD_CFLAG = {
  DESTROY_ON_DISCONNECT: 1 << 0,
  DISCONNECT_ON_CLOSE: 1 << 1,
} as const;

/** Largest device index the kernel accepts (MINORMASK >> part_shift with max_part=0). */
export const NBD_MAX_INDEX = (1 << 20) - 1;
/** Largest backend identifier we send (the kernel stores any length; keep sysfs readable). */
export const NBD_MAX_BACKEND_ID = 255;
/** Largest netlink message we send or expect (one page is plenty for the nbd family). */
export const NL_MAX_MESSAGE = 65536;
