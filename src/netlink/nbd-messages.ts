/**
 * Messages of the kernel NBD generic-netlink family ("nbd", linux/nbd-netlink.h): CONNECT,
 * DISCONNECT, RECONFIGURE and STATUS requests, their replies, and the LINK_DEAD notification.
 * Pure; see docs/kernel.md for what each attribute does to the device.
 */
import { Errno, NbddError } from '../core/errors.js';
import { attrValue, findAttr, nla, type GenlMessage, type NlAttr } from './codec.js';
import {
  NBD_ATTR,
  NBD_GENL_CMD,
  NBD_DEVICE,
  NBD_DEVICE_ITEM,
  NBD_GENL_VERSION,
  NBD_MAX_BACKEND_ID,
  NBD_MAX_INDEX,
  NBD_SOCK_FD,
  NBD_SOCK_ITEM,
} from './constants.js';
import type { GenlCommand } from './nlctrl.js';

/** Device settings CONNECT and RECONFIGURE share. Times are whole seconds. */
export interface NbdTimeouts {
  /** Per-request timeout (NBD_ATTR_TIMEOUT); 0 = kernel default (30 s check, no failure). */
  timeoutS?: number;
  /** How long I/O waits for RECONFIGURE once every socket is dead (NBD_ATTR_DEAD_CONN_TIMEOUT). */
  deadConnTimeoutS?: number;
}

export interface NbdConnectParams extends NbdTimeouts {
  /** N of /dev/nbdN; omitted = the kernel picks (reuses an idle device or adds one). */
  index?: number;
  sizeBytes: number;
  /** Logical = physical block size; a power of two from 512 to the page size. */
  blockSize?: number;
  /** NBD transmission flags (NBD_FLAG_*), as a server would send them in the handshake. */
  serverFlags: number;
  /** NBD_CFLAG_* bits. */
  clientFlags?: number;
  /** One connected stream-socket fd per connection, resolved in the sending process. */
  sockets: readonly number[];
  /** Shown in /sys/block/nbdN/backend; RECONFIGURE must then send the same string. */
  backendId?: string;
}

export interface NbdReconfigureParams extends NbdTimeouts {
  index: number;
  backendId?: string;
  /** Fresh sockets; each replaces the first dead connection slot. */
  sockets: readonly number[];
}

function checkIndex(index: number): void {
  if (!Number.isInteger(index) || index < 0 || index > NBD_MAX_INDEX) {
    throw new NbddError(Errno.EINVAL, `nbd device index ${index} is out of range 0..${NBD_MAX_INDEX}`);
  }
}

function checkSeconds(what: string, s: number | undefined): void {
  if (s !== undefined && (!Number.isSafeInteger(s) || s < 0)) throw new NbddError(Errno.EINVAL, `${what} must be whole seconds ≥ 0, not ${s}`);
}

function timeoutAttrs(p: NbdTimeouts): NlAttr[] {
  checkSeconds('timeout', p.timeoutS);
  checkSeconds('dead-connection timeout', p.deadConnTimeoutS);
  const out: NlAttr[] = [];
  if (p.timeoutS !== undefined) out.push(nla.u64(NBD_ATTR.TIMEOUT, p.timeoutS));
  if (p.deadConnTimeoutS !== undefined) out.push(nla.u64(NBD_ATTR.DEAD_CONN_TIMEOUT, p.deadConnTimeoutS));
  return out;
}

function backendIdAttrs(id: string | undefined): NlAttr[] {
  if (id === undefined) return [];
  if (id.length === 0 || Buffer.byteLength(id) > NBD_MAX_BACKEND_ID || id.includes('\0') || id.includes('\n')) {
    throw new NbddError(Errno.EINVAL, `backend identifier must be 1..${NBD_MAX_BACKEND_ID} bytes without NUL or newline`);
  }
  return [nla.string(NBD_ATTR.BACKEND_IDENTIFIER, id)];
}

/** NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD u32 } × k }. */
function socketsAttr(fds: readonly number[]): NlAttr {
  if (fds.length === 0) throw new NbddError(Errno.EINVAL, 'at least one socket is needed');
  for (const fd of fds) if (!Number.isInteger(fd) || fd < 0) throw new NbddError(Errno.EBADF, `bad socket fd ${fd}`);
  return nla.nest(NBD_ATTR.SOCKETS, fds.map((fd) => nla.nest(NBD_SOCK_ITEM, [nla.u32(NBD_SOCK_FD, fd)])));
}

function command(family: number, cmd: number, attrs: NlAttr[]): GenlCommand {
  return { family, cmd, version: NBD_GENL_VERSION, attrs };
}

/**
 * NBD_CMD_CONNECT: [INDEX] SIZE_BYTES [BLOCK_SIZE_BYTES] SERVER_FLAGS [CLIENT_FLAGS] [TIMEOUT]
 * [DEAD_CONN_TIMEOUT] [BACKEND_IDENTIFIER] SOCKETS (the kernel accepts any order). The reply carries the chosen INDEX.
 */
export function nbdConnectCommand(family: number, p: NbdConnectParams): GenlCommand {
  const attrs: NlAttr[] = [];
  if (p.index !== undefined) {
    checkIndex(p.index);
    attrs.push(nla.u32(NBD_ATTR.INDEX, p.index));
  }
  if (!Number.isSafeInteger(p.sizeBytes) || p.sizeBytes <= 0) throw new NbddError(Errno.EINVAL, `bad device size ${p.sizeBytes}`);
  attrs.push(nla.u64(NBD_ATTR.SIZE_BYTES, p.sizeBytes));
  if (p.blockSize !== undefined) {
    if (p.blockSize < 512 || p.blockSize > 65536 || (p.blockSize & (p.blockSize - 1)) !== 0) {
      throw new NbddError(Errno.EINVAL, `block size ${p.blockSize} is not a power of two from 512`);
    }
    attrs.push(nla.u64(NBD_ATTR.BLOCK_SIZE_BYTES, p.blockSize));
  }
  attrs.push(nla.u64(NBD_ATTR.SERVER_FLAGS, p.serverFlags));
  if (p.clientFlags !== undefined) attrs.push(nla.u64(NBD_ATTR.CLIENT_FLAGS, p.clientFlags));
  attrs.push(...timeoutAttrs(p), ...backendIdAttrs(p.backendId), socketsAttr(p.sockets));
  return command(family, NBD_GENL_CMD.CONNECT, attrs);
}

/** NBD_CMD_RECONFIGURE: INDEX [TIMEOUT] [DEAD_CONN_TIMEOUT] [BACKEND_IDENTIFIER] SOCKETS. */
export function nbdReconfigureCommand(family: number, p: NbdReconfigureParams): GenlCommand {
  checkIndex(p.index);
  return command(family, NBD_GENL_CMD.RECONFIGURE, [
    nla.u32(NBD_ATTR.INDEX, p.index),
    ...timeoutAttrs(p),
    ...backendIdAttrs(p.backendId),
    socketsAttr(p.sockets),
  ]);
}

/** NBD_CMD_DISCONNECT: INDEX. */
export function nbdDisconnectCommand(family: number, index: number): GenlCommand {
  checkIndex(index);
  return command(family, NBD_GENL_CMD.DISCONNECT, [nla.u32(NBD_ATTR.INDEX, index)]);
}

/** NBD_CMD_STATUS: [INDEX]; without an index the reply lists every device. */
export function nbdStatusCommand(family: number, index?: number): GenlCommand {
  if (index === undefined) return command(family, NBD_GENL_CMD.STATUS, []);
  checkIndex(index);
  return command(family, NBD_GENL_CMD.STATUS, [nla.u32(NBD_ATTR.INDEX, index)]);
}

function indexOf(msg: GenlMessage, what: string): number {
  const a = findAttr(msg.attrs, NBD_ATTR.INDEX);
  if (!a) throw new NbddError(Errno.EPROTO, `nbd ${what} message without NBD_ATTR_INDEX`);
  return attrValue.u32(a);
}

/** The CONNECT reply: `cmd = CONNECT`, NBD_ATTR_INDEX u32 = the device the kernel configured. */
export function decodeConnectReply(msg: GenlMessage): number {
  if (msg.cmd !== NBD_GENL_CMD.CONNECT) throw new NbddError(Errno.EPROTO, `nbd: CONNECT answered with command ${msg.cmd}`);
  return indexOf(msg, 'CONNECT reply');
}

export interface NbdDeviceStatus {
  index: number;
  /** The device has a configuration (even when all its sockets are dead). */
  connected: boolean;
}

/**
 * The STATUS reply: NBD_ATTR_DEVICE_LIST { NBD_DEVICE_ITEM { NBD_DEVICE_INDEX u32,
 * NBD_DEVICE_CONNECTED u8 } × n } (the kernel nests without NLA_F_NESTED).
 */
export function decodeStatusReply(msg: GenlMessage): NbdDeviceStatus[] {
  if (msg.cmd !== NBD_GENL_CMD.STATUS) throw new NbddError(Errno.EPROTO, `nbd: STATUS answered with command ${msg.cmd}`);
  const list = findAttr(msg.attrs, NBD_ATTR.DEVICE_LIST);
  if (!list) return [];
  const out: NbdDeviceStatus[] = [];
  for (const item of attrValue.nest(list)) {
    if (item.type !== NBD_DEVICE_ITEM) continue;
    const fields = attrValue.nest(item);
    const index = findAttr(fields, NBD_DEVICE.INDEX);
    const connected = findAttr(fields, NBD_DEVICE.CONNECTED);
    if (!index || !connected) throw new NbddError(Errno.EPROTO, 'nbd: STATUS device item lacks index or connected');
    out.push({ index: attrValue.u32(index), connected: attrValue.u8(connected) !== 0 });
  }
  return out;
}

/** A multicast LINK_DEAD: `cmd = LINK_DEAD`, NBD_ATTR_INDEX. Returns the index, or null for other commands. */
export function decodeLinkDead(msg: GenlMessage): number | null {
  if (msg.cmd !== NBD_GENL_CMD.LINK_DEAD) return null;
  return indexOf(msg, 'LINK_DEAD');
}
