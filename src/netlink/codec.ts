/**
 * Pure generic-netlink codec: netlink message headers, the generic-netlink header and attributes
 * (nested, 4-byte aligned). No sockets here; `src/sys/netlink-socket.ts` moves the bytes.
 *
 * Netlink integers are host order; nbdd only runs on little-endian Linux (x86-64, arm64), so this
 * file writes little-endian and `assertLittleEndian()` guards the assumption once at load.
 *
 * Decoders return views into the buffer they were given (no copies): they are valid as long as
 * the caller keeps that buffer unchanged.
 */
import { endianness } from 'node:os';
import { Errno, NbddError } from '../core/errors.js';
import {
  GENL_HDRLEN,
  NLA_F_NESTED,
  NLA_HDRLEN,
  NLA_TYPE_MASK,
  NLMSG_HDRLEN,
  NLMSGERR_ATTR,
  NLM_F,
  NL_ALIGNTO,
  NL_MAX_MESSAGE,
} from './constants.js';

if (endianness() !== 'LE') throw new Error('nbdd netlink codec assumes a little-endian host');

/** Rounds up to the netlink alignment (NLMSG_ALIGN / NLA_ALIGN). */
export function nlAlign(n: number): number {
  return (n + NL_ALIGNTO - 1) & ~(NL_ALIGNTO - 1);
}

function protocolError(message: string): NbddError {
  return new NbddError(Errno.EPROTO, `netlink: ${message}`);
}

/* ------------------------------------------------------------------ attributes: encode */

/** An attribute to encode: a leaf with its payload bytes, or a nest of attributes. */
export type NlAttr = { type: number; payload: Buffer } | { type: number; nest: NlAttr[] };

function u64Bytes(value: number): Buffer {
  if (!Number.isSafeInteger(value) || value < 0) throw new NbddError(Errno.ERANGE, `netlink: u64 out of range: ${value}`);
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(value));
  return b;
}

/** Constructors for attribute values, named by their kernel policy type (NLA_U32 ...). */
export const nla = {
  u8: (type: number, value: number): NlAttr => ({ type, payload: Buffer.from([value & 0xff]) }),
  u16: (type: number, value: number): NlAttr => {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(value);
    return { type, payload: b };
  },
  u32: (type: number, value: number): NlAttr => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value);
    return { type, payload: b };
  },
  u64: (type: number, value: number): NlAttr => ({ type, payload: u64Bytes(value) }),
  /** NLA_NUL_STRING / NLA_STRING: UTF-8 plus the terminating NUL. */
  string: (type: number, value: string): NlAttr => ({ type, payload: Buffer.from(`${value}\0`, 'utf8') }),
  nest: (type: number, children: NlAttr[]): NlAttr => ({ type, nest: children }),
};

/** Bytes `attrs` take when encoded, padding included. */
export function attrsLength(attrs: readonly NlAttr[]): number {
  let n = 0;
  for (const a of attrs) n += nlAlign(NLA_HDRLEN + ('nest' in a ? attrsLength(a.nest) : a.payload.length));
  return n;
}

/*
 * struct nlattr, then the payload, then zero padding to 4 bytes:
 *   0      2      4
 *   +------+------+---------------------+-----+
 *   | len  | type | payload (len - 4)   | pad |
 *   +------+------+---------------------+-----+
 * `len` counts header + payload, not the padding. Nests set NLA_F_NESTED in `type` and hold
 * attributes as their payload (their own padding counts in the nest's len).
 */
function writeAttrs(attrs: readonly NlAttr[], out: Buffer, offset: number): number {
  for (const a of attrs) {
    if (a.type <= 0 || a.type > NLA_TYPE_MASK) throw new NbddError(Errno.EINVAL, `netlink: bad attribute type ${a.type}`);
    const start = offset;
    offset += NLA_HDRLEN;
    if ('nest' in a) {
      offset = writeAttrs(a.nest, out, offset);
      out.writeUInt16LE(offset - start, start);
      out.writeUInt16LE(a.type | NLA_F_NESTED, start + 2);
    } else {
      offset += a.payload.copy(out, offset);
      out.writeUInt16LE(offset - start, start);
      out.writeUInt16LE(a.type, start + 2);
      offset = nlAlign(offset); // `out` is zero-filled, so the padding is already zero
    }
  }
  return offset;
}

/** Encodes attributes into a new zero-padded buffer. */
export function encodeAttrs(attrs: readonly NlAttr[]): Buffer {
  const out = Buffer.alloc(attrsLength(attrs));
  writeAttrs(attrs, out, 0);
  return out;
}

/* ------------------------------------------------------------------ messages: encode */

export interface GenlRequest {
  /** Family id (nlmsghdr type). */
  family: number;
  cmd: number;
  version: number;
  /** nlmsghdr flags, e.g. NLM_F.REQUEST | NLM_F.ACK. */
  flags: number;
  seq: number;
  attrs: readonly NlAttr[];
}

/*
 * One generic-netlink message:
 *   0         4       6        8       12      16    17        18         20
 *   +---------+-------+--------+-------+-------+-----+---------+----------+-----------+
 *   | len u32 | type  | flags  | seq   | pid   | cmd | version | reserved | attrs ... |
 *   +---------+-------+--------+-------+-------+-----+---------+----------+-----------+
 *   \______________ nlmsghdr (16) _____________/\______ genlmsghdr (4) ___/
 * `len` is the whole message; `pid` 0 addresses the kernel.
 */
export function encodeGenlMessage(req: GenlRequest): Buffer {
  const len = NLMSG_HDRLEN + GENL_HDRLEN + attrsLength(req.attrs);
  if (len > NL_MAX_MESSAGE) throw new NbddError(Errno.EINVAL, `netlink: message of ${len} bytes is too large`);
  const out = Buffer.alloc(len);
  out.writeUInt32LE(len, 0);
  out.writeUInt16LE(req.family, 4);
  out.writeUInt16LE(req.flags, 6);
  out.writeUInt32LE(req.seq >>> 0, 8);
  out.writeUInt32LE(0, 12);
  out.writeUInt8(req.cmd, 16);
  out.writeUInt8(req.version, 17);
  writeAttrs(req.attrs, out, NLMSG_HDRLEN + GENL_HDRLEN);
  return out;
}

/* ------------------------------------------------------------------ messages: decode */

/** One netlink message; `payload` is a view of the bytes after the nlmsghdr. */
export interface NlMessage {
  type: number;
  flags: number;
  seq: number;
  pid: number;
  payload: Buffer;
}

/**
 * Splits one received datagram into messages (layout above). Each message's `len` must cover its
 * header and fit in what is left; messages start 4-byte aligned. Throws EPROTO otherwise.
 */
export function decodeMessages(datagram: Buffer): NlMessage[] {
  return splitRecords(datagram, NLMSG_HDRLEN, (at) => datagram.readUInt32LE(at), 'message', 'trailing bytes after the last message', (at, len) => ({
    type: datagram.readUInt16LE(at + 4),
    flags: datagram.readUInt16LE(at + 6),
    seq: datagram.readUInt32LE(at + 8),
    pid: datagram.readUInt32LE(at + 12),
    payload: datagram.subarray(at + NLMSG_HDRLEN, at + len),
  }));
}

/**
 * Netlink messages and attributes share one framing: records that start 4-byte aligned, each
 * with a length covering its own header and fitting in what is left. Throws EPROTO otherwise,
 * and for bytes left over that cannot start a record.
 */
function splitRecords<T>(
  buf: Buffer,
  headerLength: number,
  lengthAt: (offset: number) => number,
  what: string,
  leftover: string,
  make: (offset: number, length: number) => T,
): T[] {
  const out: T[] = [];
  let offset = 0;
  while (offset + headerLength <= buf.length) {
    const len = lengthAt(offset);
    if (len < headerLength || len > buf.length - offset) {
      throw protocolError(`${what} length ${len} at offset ${offset} does not fit ${buf.length} bytes`);
    }
    out.push(make(offset, len));
    offset += nlAlign(len);
  }
  if (offset < buf.length) throw protocolError(`${buf.length - offset} ${leftover}`);
  return out;
}

export interface GenlMessage {
  cmd: number;
  version: number;
  /** Attributes, parsed from the bytes after the genlmsghdr. */
  attrs: ParsedAttr[];
}

/** Decodes the payload of a family message: genlmsghdr (layout above), then attributes. */
export function decodeGenl(payload: Buffer): GenlMessage {
  if (payload.length < GENL_HDRLEN) throw protocolError(`generic-netlink payload of ${payload.length} bytes`);
  return { cmd: payload.readUInt8(0), version: payload.readUInt8(1), attrs: parseAttrs(payload.subarray(GENL_HDRLEN)) };
}

/** An attribute as received: flag bits removed from `type`, `payload` a view without padding. */
export interface ParsedAttr {
  type: number;
  nested: boolean;
  payload: Buffer;
}

/**
 * Parses a run of attributes (layout above `writeAttrs`). Flag bits are masked off the type
 * (the kernel does not always set NLA_F_NESTED, e.g. in the nbd STATUS reply). Throws EPROTO
 * when an attribute's length is below its header or runs past the buffer.
 */
export function parseAttrs(buf: Buffer): ParsedAttr[] {
  // The last attribute's padding may be cut off by the sender; anything else is garbage.
  return splitRecords(buf, NLA_HDRLEN, (at) => buf.readUInt16LE(at), 'attribute', 'stray bytes after the attributes', (at, len) => {
    const rawType = buf.readUInt16LE(at + 2);
    return { type: rawType & NLA_TYPE_MASK, nested: (rawType & NLA_F_NESTED) !== 0, payload: buf.subarray(at + NLA_HDRLEN, at + len) };
  });
}

/** The first attribute of that type, or undefined. */
export function findAttr(attrs: readonly ParsedAttr[], type: number): ParsedAttr | undefined {
  return attrs.find((a) => a.type === type);
}

function fixedPayload(a: ParsedAttr, size: number, what: string): Buffer {
  if (a.payload.length < size) throw protocolError(`${what} attribute ${a.type} has ${a.payload.length} bytes`);
  return a.payload;
}

export const attrValue = {
  u8: (a: ParsedAttr): number => fixedPayload(a, 1, 'u8').readUInt8(0),
  u16: (a: ParsedAttr): number => fixedPayload(a, 2, 'u16').readUInt16LE(0),
  u32: (a: ParsedAttr): number => fixedPayload(a, 4, 'u32').readUInt32LE(0),
  u64: (a: ParsedAttr): number => {
    const v = fixedPayload(a, 8, 'u64').readBigUInt64LE(0);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`u64 attribute ${a.type} too large: ${v}`);
    return Number(v);
  },
  /** A NUL-terminated string; stops at the first NUL (or the end when there is none). */
  string: (a: ParsedAttr): string => {
    const nul = a.payload.indexOf(0);
    return a.payload.toString('utf8', 0, nul < 0 ? a.payload.length : nul);
  },
  nest: (a: ParsedAttr): ParsedAttr[] => parseAttrs(a.payload),
};

/** What an NLMSG_ERROR says: `errno` 0 is a plain acknowledgement. */
export interface NlAck {
  errno: number;
  /** The request's sequence number, from the echoed header. */
  seq: number;
  /** Extended-ack text (NLMSGERR_ATTR_MSG), when the kernel gave one. */
  message?: string;
}

/*
 * NLMSG_ERROR payload:
 *   0           4                  20
 *   +-----------+------------------+----------------------------+----------------+
 *   | s32 error | echoed nlmsghdr  | echoed payload (not CAPPED)| ext-ack TLVs   |
 *   +-----------+------------------+----------------------------+----------------+
 * `error` is 0 (ACK) or -errno. TLVs only when the message flags carry NLM_F_ACK_TLVS.
 */
export function decodeNlError(msg: NlMessage): NlAck {
  const p = msg.payload;
  if (p.length < 4 + NLMSG_HDRLEN) throw protocolError(`NLMSG_ERROR payload of ${p.length} bytes`);
  const error = p.readInt32LE(0);
  const seq = p.readUInt32LE(4 + 8);
  const ack: NlAck = { errno: error === 0 ? 0 : -error, seq };
  if (msg.flags & NLM_F.ACK_TLVS) {
    const echoedLen = msg.flags & NLM_F.CAPPED ? NLMSG_HDRLEN : p.readUInt32LE(4);
    const tlvStart = 4 + nlAlign(echoedLen);
    if (tlvStart <= p.length) {
      const text = findAttr(parseAttrs(p.subarray(tlvStart)), NLMSGERR_ATTR.MSG);
      if (text) ack.message = attrValue.string(text);
    }
  }
  return ack;
}
