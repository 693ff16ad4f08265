/**
 * NBD fixed-newstyle negotiation: pure encoders and decoders for both sides (server and client).
 * No sockets here; `src/nbd/server/session.ts` and `src/nbd/client/` drive these.
 *
 * Decoders take exactly the bytes of one structure (the state machine knows the sizes) and throw
 * `ProtocolError` on malformed input; the caller decides whether that is an option error reply
 * (NBD_REP_ERR_INVALID) or a disconnect.
 */
import {
  IHAVEOPT,
  LIMITS,
  NBDMAGIC,
  NBD_INFO,
  NBD_OPT_REPLY_MAGIC,
} from './constants.js';

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function decodeString(buf: Buffer, what: string): string {
  if (buf.length > LIMITS.maxString) throw new ProtocolError(`${what} is ${buf.length} bytes (limit ${LIMITS.maxString})`);
  try {
    return utf8.decode(buf);
  } catch {
    throw new ProtocolError(`${what} is not valid UTF-8`);
  }
}

/* ---------------------------------------------------------------- greeting ---------------- */

export const GREETING_LENGTH = 18;

/**
 * Server greeting (18 bytes):
 *   0 u64 NBDMAGIC | 8 u64 IHAVEOPT | 16 u16 handshake flags
 */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_LENGTH);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function decodeGreeting(b: Buffer): { handshakeFlags: number } {
  if (b.readBigUInt64BE(0) !== NBDMAGIC) throw new ProtocolError('bad NBD magic: not an NBD server');
  if (b.readBigUInt64BE(8) !== IHAVEOPT) throw new ProtocolError('server does not speak the newstyle protocol');
  return { handshakeFlags: b.readUInt16BE(16) };
}

/** Client flags: `0 u32 flags`. */
export const CLIENT_FLAGS_LENGTH = 4;

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/* ---------------------------------------------------------------- options (client → server) */

export const OPTION_HEADER_LENGTH = 16;

/**
 * Option header (16 bytes), followed by `length` bytes of data:
 *   0 u64 IHAVEOPT | 8 u32 option | 12 u32 length
 */
export function decodeOptionHeader(b: Buffer): { option: number; length: number } {
  if (b.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('bad option magic');
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOption(option: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_LENGTH);
  return b;
}

const EMPTY = Buffer.alloc(0);

/**
 * Both INFO/GO and META_CONTEXT data open with the export name: u32 length n, n bytes. Decodes
 * it, making sure at least `rest` bytes follow; returns the name and where the rest starts.
 */
function decodeExportNamePrefix(d: Buffer, rest: number, what: string): { exportName: string; at: number } {
  if (d.length < 4 + rest) throw new ProtocolError(`${what} data shorter than ${4 + rest} bytes`);
  const n = d.readUInt32BE(0);
  if (n > d.length - 4 - rest) throw new ProtocolError(`${what} export name runs past the option`);
  return { exportName: decodeString(d.subarray(4, 4 + n), 'export name'), at: 4 + n };
}

/** A buffer of `4 + name + rest` bytes holding the export-name prefix; returns it and where the rest starts. */
function encodeExportNamePrefix(exportName: string, rest: number): { b: Buffer; at: number } {
  const name = Buffer.from(exportName, 'utf8');
  const b = Buffer.allocUnsafe(4 + name.length + rest);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  return { b, at: 4 + name.length };
}

export interface InfoRequest {
  exportName: string;
  infos: number[];
}

/**
 * NBD_OPT_INFO / NBD_OPT_GO data:
 *   0 u32 name length n | 4 name (n bytes) | 4+n u16 count k | 6+n k × u16 info type
 */
export function decodeInfoRequest(d: Buffer): InfoRequest {
  const { exportName, at } = decodeExportNamePrefix(d, 2, 'INFO/GO');
  const k = d.readUInt16BE(at);
  if (d.length !== at + 2 + 2 * k) throw new ProtocolError('INFO/GO length does not match its info count');
  const infos: number[] = [];
  for (let i = 0; i < k; i++) infos.push(d.readUInt16BE(at + 2 + 2 * i));
  return { exportName, infos };
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const { b, at } = encodeExportNamePrefix(req.exportName, 2 + 2 * req.infos.length);
  b.writeUInt16BE(req.infos.length, at);
  req.infos.forEach((t, i) => b.writeUInt16BE(t, at + 2 + 2 * i));
  return b;
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/**
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data:
 *   0 u32 export name length n | 4 name | 4+n u32 query count k | k × (u32 length m, m bytes query)
 */
export function decodeMetaContextRequest(d: Buffer): MetaContextRequest {
  const prefix = decodeExportNamePrefix(d, 4, 'META_CONTEXT');
  let at = prefix.at;
  const k = d.readUInt32BE(at);
  at += 4;
  if (k > LIMITS.maxMetaQueries) throw new ProtocolError(`${k} meta-context queries (limit ${LIMITS.maxMetaQueries})`);
  const queries: string[] = [];
  for (let i = 0; i < k; i++) {
    if (at + 4 > d.length) throw new ProtocolError('META_CONTEXT query runs past the option');
    const m = d.readUInt32BE(at);
    at += 4;
    if (m > d.length - at) throw new ProtocolError('META_CONTEXT query runs past the option');
    queries.push(decodeString(d.subarray(at, at + m), 'meta-context query'));
    at += m;
  }
  if (at !== d.length) throw new ProtocolError('META_CONTEXT option has trailing bytes');
  return { exportName: prefix.exportName, queries };
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const qs = req.queries.map((q) => Buffer.from(q, 'utf8'));
  const prefix = encodeExportNamePrefix(req.exportName, 4 + qs.reduce((s, q) => s + 4 + q.length, 0));
  const b = prefix.b;
  let at = prefix.at;
  b.writeUInt32BE(qs.length, at);
  at += 4;
  for (const q of qs) {
    b.writeUInt32BE(q.length, at);
    q.copy(b, at + 4);
    at += 4 + q.length;
  }
  return b;
}

/* ---------------------------------------------------------------- option replies (server → client) */

export const OPTION_REPLY_HEADER_LENGTH = 20;

/**
 * Option reply (20-byte header, then `length` bytes):
 *   0 u64 0x0003e889045565a9 | 8 u32 option | 12 u32 reply type | 16 u32 length
 */
export function encodeOptionReply(option: number, type: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_LENGTH);
  return b;
}

export function decodeOptionReplyHeader(b: Buffer): { option: number; type: number; length: number } {
  if (b.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC) throw new ProtocolError('bad option reply magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export function isOptionError(type: number): boolean {
  return (type & 0x80000000) !== 0;
}

/** An error reply with a human-readable message (UTF-8, no NUL). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, Buffer.from(message, 'utf8'));
}

/**
 * NBD_REP_SERVER data: 0 u32 name length n | 4 name | 4+n description (rest).
 */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function decodeRepServer(d: Buffer): { name: string; description: string } {
  if (d.length < 4) throw new ProtocolError('REP_SERVER shorter than 4 bytes');
  const n = d.readUInt32BE(0);
  if (n > d.length - 4) throw new ProtocolError('REP_SERVER name runs past the reply');
  return {
    name: decodeString(d.subarray(4, 4 + n), 'export name'),
    description: decodeString(d.subarray(4 + n), 'export description'),
  };
}

/** NBD_REP_META_CONTEXT data: 0 u32 context id | 4 name (rest). */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

export function decodeRepMetaContext(d: Buffer): { id: number; name: string } {
  if (d.length < 4) throw new ProtocolError('REP_META_CONTEXT shorter than 4 bytes');
  return { id: d.readUInt32BE(0), name: decodeString(d.subarray(4), 'meta-context name') };
}

/* ---------------------------------------------------------------- info payloads */

/** NBD_INFO_EXPORT (12 bytes): 0 u16 type 0 | 2 u64 size | 10 u16 transmission flags. */
export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_NAME / NBD_INFO_DESCRIPTION: 0 u16 type | 2 string (rest). */
export function encodeInfoString(type: typeof NBD_INFO.NAME | typeof NBD_INFO.DESCRIPTION, value: string): Buffer {
  const s = Buffer.from(value, 'utf8');
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE (14 bytes): 0 u16 type 3 | 2 u32 minimum | 6 u32 preferred | 10 u32 maximum payload. */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

export type DecodedInfo =
  | { type: typeof NBD_INFO.EXPORT; size: number; flags: number }
  | { type: typeof NBD_INFO.NAME; name: string }
  | { type: typeof NBD_INFO.DESCRIPTION; description: string }
  | { type: typeof NBD_INFO.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: 'unknown'; code: number };

export function decodeInfo(d: Buffer): DecodedInfo {
  if (d.length < 2) throw new ProtocolError('REP_INFO shorter than 2 bytes');
  const type = d.readUInt16BE(0);
  switch (type) {
    case NBD_INFO.EXPORT: {
      if (d.length !== 12) throw new ProtocolError('INFO_EXPORT is not 12 bytes');
      const size = d.readBigUInt64BE(2);
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('export size over 2^53 bytes');
      return { type, size: Number(size), flags: d.readUInt16BE(10) };
    }
    case NBD_INFO.NAME:
      return { type, name: decodeString(d.subarray(2), 'export name') };
    case NBD_INFO.DESCRIPTION:
      return { type, description: decodeString(d.subarray(2), 'export description') };
    case NBD_INFO.BLOCK_SIZE:
      if (d.length !== 14) throw new ProtocolError('INFO_BLOCK_SIZE is not 14 bytes');
      return { type, minimum: d.readUInt32BE(2), preferred: d.readUInt32BE(6), maximum: d.readUInt32BE(10) };
    default:
      return { type: 'unknown', code: type };
  }
}

/* ---------------------------------------------------------------- NBD_OPT_EXPORT_NAME reply */

/**
 * Reply to NBD_OPT_EXPORT_NAME (no option-reply header):
 *   0 u64 size | 8 u16 transmission flags | 10 124 zero bytes (omitted with NO_ZEROES)
 */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

