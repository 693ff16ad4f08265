/**
 * NBD protocol constants, named as in NetworkBlockDevice/nbd doc/proto.md. All integers on the
 * wire are big-endian.
 */
import { Errno } from '../../core/errors.js';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPT_REPLY_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;
export const NBD_DEFAULT_PORT = 10809;

/** Handshake flags (server, u16). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (u32). */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags (u16). */
export const NBD_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

export const NBD_INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const NBD_CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  /** Error chunks have bit 15 set: 0x8001, 0x8002. */
  ERROR: 32769,
  ERROR_OFFSET: 32770,
} as const;

/** base:allocation flags. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap flag. */
export const NBD_STATE_DIRTY = 1 << 0;

/** NBD error values (the wire's own numbering, equal to Linux's for these). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Limits we enforce before buffering anything from a peer. */
export const LIMITS = {
  /** Longest option payload we accept during negotiation. */
  maxOptionLength: 64 * 1024,
  /** Longest string (export name, context name) per the spec. */
  maxString: 4096,
  /** Most meta-context queries in one option. */
  maxMetaQueries: 128,
  /** Largest READ/WRITE payload we accept or advertise. */
  maxPayload: 32 * 1024 * 1024,
  /** Most options one client may send before we give up on it. */
  maxOptions: 256,
  /** Most extents per block-status chunk. */
  maxExtents: 1 << 20,
} as const;

/**
 * The one table between errno and the NBD wire. Each NBD error is listed with the errnos that
 * map to it; the first is what our client turns it back into. Unknown NBD errors read as EINVAL
 * (the spec's rule); unknown errnos are sent as EIO: the request failed, not the client.
 */
const ERRNO_OF_NBD_ERR: readonly (readonly [nbdError: number, errnos: readonly number[]])[] = [
  [NBD_ERR.EPERM, [Errno.EPERM, Errno.EROFS, Errno.EACCES]],
  [NBD_ERR.EIO, [Errno.EIO, Errno.EUCLEAN]],
  [NBD_ERR.ENOMEM, [Errno.ENOMEM]],
  [NBD_ERR.EINVAL, [Errno.EINVAL]],
  [NBD_ERR.ENOSPC, [Errno.ENOSPC, Errno.EFBIG]],
  [NBD_ERR.EOVERFLOW, [Errno.EOVERFLOW]],
  [NBD_ERR.ENOTSUP, [Errno.ENOTSUP, Errno.ENOSYS]],
  [NBD_ERR.ESHUTDOWN, [Errno.ESHUTDOWN]],
];
const NBD_ERR_BY_ERRNO = new Map(ERRNO_OF_NBD_ERR.flatMap(([nbd, errnos]) => errnos.map((e) => [e, nbd] as const)));
const ERRNO_BY_NBD_ERR = new Map(ERRNO_OF_NBD_ERR.map(([nbd, errnos]) => [nbd, errnos[0]!] as const));

/**
 * errno → NBD error, aware of the request's flags as nbdkit's table is: NBD_ENOTSUP answers only
 * a FAST_ZERO write-zeroes (the client then falls back to writing zeroes) and NBD_EOVERFLOW only
 * a DF read; both are EINVAL otherwise, the value every client understands.
 */
export function nbdErrorFromErrno(errno: number, flags = 0): number {
  const error = NBD_ERR_BY_ERRNO.get(errno) ?? NBD_ERR.EIO;
  if (error === NBD_ERR.ENOTSUP && !(flags & NBD_CMD_FLAG.FAST_ZERO)) return NBD_ERR.EINVAL;
  if (error === NBD_ERR.EOVERFLOW && !(flags & NBD_CMD_FLAG.DF)) return NBD_ERR.EINVAL;
  return error;
}

/** The reverse, for our client: NBD error value to errno (unknown ⇒ EINVAL per the spec). */
export function errnoFromNbdError(error: number): number {
  return ERRNO_BY_NBD_ERR.get(error) ?? Errno.EINVAL;
}

function nameTable(table: Record<string, number>, prefix: string): (value: number) => string {
  const names = new Map(Object.entries(table).map(([k, v]) => [v, `${prefix}${k}`]));
  return (value) => names.get(value) ?? `${prefix}${value}`;
}

export const nameOfNbdCmd = nameTable(NBD_CMD, 'NBD_CMD_');
export const nameOfNbdOpt = nameTable(NBD_OPT, 'NBD_OPT_');
export const nameOfNbdRep = nameTable(NBD_REP, 'NBD_REP_');
export const nameOfNbdInfo = nameTable(NBD_INFO, 'NBD_INFO_');
export const nameOfNbdReplyType = nameTable(NBD_REPLY_TYPE, 'NBD_REPLY_TYPE_');
