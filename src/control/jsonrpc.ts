/**
 * JSON-RPC 2.0 over newline-delimited JSON: line framing with a length bound, request
 * validation, batch handling and error objects. Pure: no sockets (see control-server.ts).
 *
 * Framing: one JSON text per line, UTF-8, `\n`-terminated (a trailing `\r` is ignored, empty lines
 * are skipped). A line longer than `maxLine` bytes is discarded up to its newline and answered
 * with an Invalid Request error; the connection stays usable.
 */
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';

export const JSONRPC_VERSION = '2.0';
/** Longest request line (bytes, without the newline). */
export const MAX_LINE_BYTES = 1024 * 1024;
/** Most requests in one batch. */
export const MAX_BATCH = 256;

export const RPC_ERROR = {
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
  /** An operation failed (NbddError): `data.errno` names the errno. */
  OPERATION_FAILED: -32000,
} as const;

export type RpcId = string | number | null;

export class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = 'RpcError';
  }
}

export interface RpcErrorObject {
  code: number;
  message: string;
  data?: unknown;
}

export type RpcResponse =
  | { jsonrpc: '2.0'; id: RpcId; result: unknown }
  | { jsonrpc: '2.0'; id: RpcId; error: RpcErrorObject };

/* ------------------------------------------------------------ framing */

export type LineEvent = { line: string } | { tooLong: number };

/** Splits a byte stream into lines, bounding each line before buffering past the bound. */
export class LineSplitter {
  private chunks: Buffer[] = [];
  private bytes = 0;
  /** Bytes of the current over-long line seen so far (discarding), or -1. */
  private discarding = -1;

  constructor(private readonly maxLine = MAX_LINE_BYTES) {}

  /** Feeds `chunk`; returns the complete lines (and over-long line reports) it finished. */
  push(chunk: Buffer): LineEvent[] {
    const out: LineEvent[] = [];
    let at = 0;
    while (at < chunk.length) {
      const nl = chunk.indexOf(0x0a, at);
      const end = nl < 0 ? chunk.length : nl;
      const piece = chunk.subarray(at, end);
      if (this.discarding >= 0) {
        this.discarding += piece.length;
      } else if (this.bytes + piece.length > this.maxLine) {
        this.discarding = this.bytes + piece.length;
        this.chunks = [];
        this.bytes = 0;
      } else if (piece.length > 0) {
        this.chunks.push(piece);
        this.bytes += piece.length;
      }
      if (nl < 0) break;
      if (this.discarding >= 0) {
        out.push({ tooLong: this.discarding });
        this.discarding = -1;
      } else {
        let line = Buffer.concat(this.chunks, this.bytes).toString('utf8');
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line.trim().length > 0) out.push({ line });
      }
      this.chunks = [];
      this.bytes = 0;
      at = nl + 1;
    }
    // Copy what is kept: `chunk` may be reused by the socket.
    if (this.chunks.length > 0 && this.chunks[this.chunks.length - 1]!.buffer === chunk.buffer) {
      this.chunks[this.chunks.length - 1] = Buffer.from(this.chunks[this.chunks.length - 1]!);
    }
    return out;
  }
}

/* ------------------------------------------------------------ parameters */

/**
 * A parameter schema: name → type, `?` suffix for optional. Types: string, integer (safe,
 * ≥ 0), boolean, string[], object.
 */
export type ParamSpec = Record<string, `${'string' | 'integer' | 'boolean' | 'string[]' | 'object'}${'' | '?'}`>;

/** Checks by-name `params` against `spec` (unknown names refused). Throws INVALID_PARAMS. */
export function checkParams(params: unknown, spec: ParamSpec): Record<string, unknown> {
  if (params === undefined) params = {};
  if (typeof params !== 'object' || params === null || Array.isArray(params)) {
    throw new RpcError(RPC_ERROR.INVALID_PARAMS, 'params must be an object (by-name)');
  }
  const p = params as Record<string, unknown>;
  for (const key of Object.keys(p)) {
    // Own keys only: `in` would accept '__proto__', 'constructor', 'toString'.
    if (!Object.hasOwn(spec, key)) throw new RpcError(RPC_ERROR.INVALID_PARAMS, `unknown parameter '${key}'`);
  }
  for (const [key, typeSpec] of Object.entries(spec)) {
    const optional = typeSpec.endsWith('?');
    const type = optional ? typeSpec.slice(0, -1) : typeSpec;
    const v = p[key];
    if (v === undefined) {
      if (!optional) throw new RpcError(RPC_ERROR.INVALID_PARAMS, `missing parameter '${key}'`);
      continue;
    }
    const ok =
      type === 'string' ? typeof v === 'string'
      : type === 'integer' ? Number.isSafeInteger(v) && (v as number) >= 0
      : type === 'boolean' ? typeof v === 'boolean'
      : type === 'string[]' ? Array.isArray(v) && v.every((x) => typeof x === 'string')
      : typeof v === 'object' && v !== null && !Array.isArray(v);
    if (!ok) throw new RpcError(RPC_ERROR.INVALID_PARAMS, `parameter '${key}' must be ${type === 'integer' ? 'a non-negative integer' : `of type ${type}`}`);
  }
  return p;
}

/* ------------------------------------------------------------ dispatch */

export interface Method<C> {
  params: ParamSpec;
  /** Result must be JSON-serializable. Throw RpcError or NbddError. */
  handler: (params: Record<string, unknown>, context: C) => unknown;
}

export type MethodTable<C> = Record<string, Method<C>>;

function errorObject(err: unknown): RpcErrorObject {
  if (err instanceof RpcError) return err.data === undefined ? { code: err.code, message: err.message } : { code: err.code, message: err.message, data: err.data };
  if (err instanceof NbddError) return { code: RPC_ERROR.OPERATION_FAILED, message: err.message, data: { errno: nameOfErrno(err.errno) } };
  return { code: RPC_ERROR.INTERNAL_ERROR, message: 'internal error', data: { errno: nameOfErrno(Errno.EIO) } };
}

function isValidId(id: unknown): id is RpcId {
  return id === null || typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id));
}

/** Handles one request object; null for a notification (no response, even on error). */
async function handleOne<C>(req: unknown, methods: MethodTable<C>, context: C): Promise<RpcResponse | null> {
  if (typeof req !== 'object' || req === null || Array.isArray(req)) {
    return { jsonrpc: JSONRPC_VERSION, id: null, error: { code: RPC_ERROR.INVALID_REQUEST, message: 'a request must be an object' } };
  }
  const r = req as Record<string, unknown>;
  const hasId = 'id' in r;
  const id: RpcId = hasId && isValidId(r.id) ? r.id : null;
  const fail = (code: number, message: string): RpcResponse => ({ jsonrpc: JSONRPC_VERSION, id, error: { code, message } });
  if (r.jsonrpc !== JSONRPC_VERSION) return fail(RPC_ERROR.INVALID_REQUEST, "'jsonrpc' must be \"2.0\"");
  if (hasId && !isValidId(r.id)) return fail(RPC_ERROR.INVALID_REQUEST, "'id' must be a string, a number or null");
  if (typeof r.method !== 'string') return fail(RPC_ERROR.INVALID_REQUEST, "'method' must be a string");
  if ('params' in r && (typeof r.params !== 'object' || r.params === null)) return fail(RPC_ERROR.INVALID_REQUEST, "'params' must be an object or an array");
  const method = Object.hasOwn(methods, r.method) ? methods[r.method] : undefined;
  let response: RpcResponse;
  if (!method) response = fail(RPC_ERROR.METHOD_NOT_FOUND, `method '${r.method}' not found`);
  else {
    try {
      const result = await method.handler(checkParams(r.params, method.params), context);
      response = { jsonrpc: JSONRPC_VERSION, id, result: result === undefined ? null : result };
    } catch (err) {
      response = { jsonrpc: JSONRPC_VERSION, id, error: errorObject(err) };
    }
  }
  return hasId ? response : null;
}

/**
 * Handles one line: a request, a notification or a batch. Returns the response text (without
 * newline) or null when nothing is to be sent.
 */
export async function handleLine<C>(line: string, methods: MethodTable<C>, context: C): Promise<string | null> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch {
    return JSON.stringify({ jsonrpc: JSONRPC_VERSION, id: null, error: { code: RPC_ERROR.PARSE_ERROR, message: 'parse error: not valid JSON' } });
  }
  if (!Array.isArray(parsed)) {
    const res = await handleOne(parsed, methods, context);
    return res ? JSON.stringify(res) : null;
  }
  if (parsed.length === 0 || parsed.length > MAX_BATCH) {
    return JSON.stringify({
      jsonrpc: JSONRPC_VERSION,
      id: null,
      error: { code: RPC_ERROR.INVALID_REQUEST, message: parsed.length === 0 ? 'empty batch' : `a batch holds at most ${MAX_BATCH} requests` },
    });
  }
  const responses = (await Promise.all(parsed.map((req) => handleOne(req, methods, context)))).filter((r) => r !== null);
  return responses.length > 0 ? JSON.stringify(responses) : null;
}

/** The response to an over-long line. */
export function tooLongResponse(bytes: number, maxLine = MAX_LINE_BYTES): string {
  return JSON.stringify({
    jsonrpc: JSONRPC_VERSION,
    id: null,
    error: { code: RPC_ERROR.INVALID_REQUEST, message: `request line of ${bytes} bytes exceeds the limit of ${maxLine}` },
  });
}

/** A notification text (server → client). */
export function notification(method: string, params: unknown): string {
  return JSON.stringify({ jsonrpc: JSONRPC_VERSION, method, params });
}
