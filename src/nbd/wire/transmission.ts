/**
 * NBD transmission phase: requests and replies, pure encoders/decoders for both sides.
 *
 * Cookies are opaque 8-byte values; they are carried as two u32 halves (`cookieHi`, `cookieLo`) so
 * the hot path never allocates a BigInt. Offsets and lengths are JavaScript numbers; anything at or
 * past 2^53 is rejected when decoded.
 */
import {
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from './constants.js';
import { ProtocolError } from './handshake.js';

const TWO_POW_32 = 0x1_0000_0000;
/** High u32 of a u64 that keeps the value below 2^53. */
const MAX_SAFE_HIGH = 0x1f_ffff;

function readU64(b: Buffer, at: number, what: string): number {
  const hi = b.readUInt32BE(at);
  if (hi > MAX_SAFE_HIGH) throw new ProtocolError(`${what} is past 2^53`);
  return hi * TWO_POW_32 + b.readUInt32BE(at + 4);
}

function writeU64(b: Buffer, value: number, at: number): void {
  b.writeUInt32BE(Math.floor(value / TWO_POW_32), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}

/* ---------------------------------------------------------------- requests */

export const REQUEST_HEADER_LENGTH = 28;

export interface RequestHeader {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

/**
 * Compact request (28 bytes), followed by `length` bytes of data for NBD_CMD_WRITE:
 *   0 u32 0x25609513 | 4 u16 command flags | 6 u16 type | 8 u64 cookie | 16 u64 offset | 24 u32 length
 * Throws ProtocolError on a bad magic (the caller must disconnect: framing is lost); an offset
 * past 2^53 decodes as OFFSET_UNREPRESENTABLE.
 */
/**
 * What a request offset of 2^53 or more decodes to: not representable, and past the end of any
 * export, so validation answers EINVAL and the connection goes on (the frame itself is sound).
 */
export const OFFSET_UNREPRESENTABLE = 2 ** 53;

export function decodeRequest(b: Buffer): RequestHeader {
  if (b.readUInt32BE(0) !== NBD_REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${b.readUInt32BE(0).toString(16)}`);
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookieHi: b.readUInt32BE(8),
    cookieLo: b.readUInt32BE(12),
    offset: b.readUInt32BE(16) > MAX_SAFE_HIGH ? OFFSET_UNREPRESENTABLE : readU64(b, 16, 'request offset'),
    length: b.readUInt32BE(24),
  };
}

export function encodeRequest(r: RequestHeader): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_LENGTH);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeUInt32BE(r.cookieHi, 8);
  b.writeUInt32BE(r.cookieLo, 12);
  writeU64(b, r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/* ---------------------------------------------------------------- simple replies */

export const SIMPLE_REPLY_LENGTH = 16;

/**
 * Simple reply (16 bytes), followed by the READ data when error is 0:
 *   0 u32 0x67446698 | 4 u32 error | 8 u64 cookie
 */
export function encodeSimpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

/* ---------------------------------------------------------------- structured replies */

export const CHUNK_HEADER_LENGTH = 20;

/**
 * Structured reply chunk header (20 bytes), followed by `length` bytes of payload:
 *   0 u32 0x668e33ef | 4 u16 flags (bit 0 DONE) | 6 u16 type | 8 u64 cookie | 16 u32 length
 */
function writeChunkHeader(b: Buffer, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

const doneFlag = (done: boolean): number => (done ? NBD_REPLY_FLAG_DONE : 0);

/** NBD_REPLY_TYPE_NONE: header only, DONE set. */
export function encodeChunkNone(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH);
  writeChunkHeader(b, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.NONE, cookieHi, cookieLo, 0);
  return b;
}

/**
 * NBD_REPLY_TYPE_OFFSET_DATA header plus the offset (28 bytes); `dataLength` bytes of data follow
 * (sent separately, so the data is never copied):
 *   header(len = 8 + dataLength) | 20 u64 offset
 */
export function encodeChunkOffsetDataHeader(cookieHi: number, cookieLo: number, done: boolean, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH + 8);
  writeChunkHeader(b, doneFlag(done), NBD_REPLY_TYPE.OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength);
  writeU64(b, offset, 20);
  return b;
}

/** NBD_REPLY_TYPE_OFFSET_HOLE (32 bytes): header(len 12) | 20 u64 offset | 28 u32 hole size. */
export function encodeChunkOffsetHole(cookieHi: number, cookieLo: number, done: boolean, offset: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH + 12);
  writeChunkHeader(b, doneFlag(done), NBD_REPLY_TYPE.OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeU64(b, offset, 20);
  b.writeUInt32BE(size, 28);
  return b;
}

/**
 * NBD_REPLY_TYPE_BLOCK_STATUS: header(len 4 + 8n) | 20 u32 context id | n × (u32 length, u32 flags).
 * `extents` is a flat list [length0, flags0, length1, flags1, ...].
 */
export function encodeChunkBlockStatus(cookieHi: number, cookieLo: number, done: boolean, contextId: number, extents: number[]): Buffer {
  const payload = 4 + extents.length * 4;
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH + payload);
  writeChunkHeader(b, doneFlag(done), NBD_REPLY_TYPE.BLOCK_STATUS, cookieHi, cookieLo, payload);
  b.writeUInt32BE(contextId, 20);
  for (let i = 0; i < extents.length; i++) b.writeUInt32BE(extents[i]! >>> 0, 24 + 4 * i);
  return b;
}

/**
 * NBD_REPLY_TYPE_ERROR: header(len 6 + m) | 20 u32 error | 24 u16 message length m | 26 message.
 * With `offset`, NBD_REPLY_TYPE_ERROR_OFFSET: the same plus a trailing u64 offset.
 */
export function encodeChunkError(cookieHi: number, cookieLo: number, done: boolean, error: number, message: string, offset?: number): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), 'utf8');
  const withOffset = offset !== undefined;
  const payload = 6 + msg.length + (withOffset ? 8 : 0);
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH + payload);
  writeChunkHeader(b, doneFlag(done), withOffset ? NBD_REPLY_TYPE.ERROR_OFFSET : NBD_REPLY_TYPE.ERROR, cookieHi, cookieLo, payload);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (withOffset) writeU64(b, offset, 26 + msg.length);
  return b;
}

/* ---------------------------------------------------------------- replies, client side */

/** Both reply kinds start with a u32 magic; simple replies are 16 bytes, chunk headers 20. */
export type ReplyHeader =
  | { kind: 'simple'; error: number; cookieHi: number; cookieLo: number }
  | { kind: 'chunk'; flags: number; type: number; cookieHi: number; cookieLo: number; length: number };

/** Bytes to read for the header that starts with `magic`; ProtocolError if unknown. */
export function replyHeaderLength(magic: number): number {
  if (magic === NBD_SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_LENGTH;
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) return CHUNK_HEADER_LENGTH;
  throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}

export function decodeReplyHeader(b: Buffer): ReplyHeader {
  const magic = b.readUInt32BE(0);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    return { kind: 'simple', error: b.readUInt32BE(4), cookieHi: b.readUInt32BE(8), cookieLo: b.readUInt32BE(12) };
  }
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    return {
      kind: 'chunk',
      flags: b.readUInt16BE(4),
      type: b.readUInt16BE(6),
      cookieHi: b.readUInt32BE(8),
      cookieLo: b.readUInt32BE(12),
      length: b.readUInt32BE(16),
    };
  }
  throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}

export const OFFSET_DATA_PREFIX_LENGTH = 8;

/**
 * The start of an NBD_REPLY_TYPE_OFFSET_DATA payload, for clients that stream the data into place
 * instead of buffering the whole chunk:
 *   0 u64 offset | 8 data (chunk length - 8 bytes)
 */
export function decodeOffsetDataPrefix(p: Buffer): number {
  return readU64(p, 0, 'chunk offset');
}

export type DecodedChunk =
  | { type: typeof NBD_REPLY_TYPE.NONE }
  | { type: typeof NBD_REPLY_TYPE.OFFSET_DATA; offset: number; data: Buffer }
  | { type: typeof NBD_REPLY_TYPE.OFFSET_HOLE; offset: number; size: number }
  | { type: typeof NBD_REPLY_TYPE.BLOCK_STATUS; contextId: number; extents: number[] }
  | { type: typeof NBD_REPLY_TYPE.ERROR; error: number; message: string; offset?: number }
  | { type: 'unknown'; code: number; isError: boolean };

/** Decodes one chunk's payload (`p`, exactly `length` bytes). Data views alias `p`. */
export function decodeChunkPayload(type: number, p: Buffer): DecodedChunk {
  switch (type) {
    case NBD_REPLY_TYPE.NONE:
      if (p.length !== 0) throw new ProtocolError('NONE chunk with a payload');
      return { type };
    case NBD_REPLY_TYPE.OFFSET_DATA:
      if (p.length < 9) throw new ProtocolError('OFFSET_DATA chunk shorter than 9 bytes');
      return { type, offset: readU64(p, 0, 'chunk offset'), data: p.subarray(8) };
    case NBD_REPLY_TYPE.OFFSET_HOLE:
      if (p.length !== 12) throw new ProtocolError('OFFSET_HOLE chunk is not 12 bytes');
      return { type, offset: readU64(p, 0, 'chunk offset'), size: p.readUInt32BE(8) };
    case NBD_REPLY_TYPE.BLOCK_STATUS: {
      if (p.length < 12 || (p.length - 4) % 8 !== 0) throw new ProtocolError('malformed BLOCK_STATUS chunk');
      const extents: number[] = [];
      for (let at = 4; at < p.length; at += 4) extents.push(p.readUInt32BE(at));
      return { type, contextId: p.readUInt32BE(0), extents };
    }
    case NBD_REPLY_TYPE.ERROR:
    case NBD_REPLY_TYPE.ERROR_OFFSET: {
      if (p.length < 6) throw new ProtocolError('error chunk shorter than 6 bytes');
      const m = p.readUInt16BE(4);
      const extra = type === NBD_REPLY_TYPE.ERROR_OFFSET ? 8 : 0;
      if (p.length !== 6 + m + extra) throw new ProtocolError('error chunk length does not match its message');
      const message = p.toString('utf8', 6, 6 + m);
      const error = p.readUInt32BE(0);
      return extra
        ? { type: NBD_REPLY_TYPE.ERROR, error, message, offset: readU64(p, 6 + m, 'error offset') }
        : { type: NBD_REPLY_TYPE.ERROR, error, message };
    }
    default:
      return { type: 'unknown', code: type, isError: (type & 0x8000) !== 0 };
  }
}
