/**
 * NBD client, fixed-newstyle negotiation: greeting, client flags, STRUCTURED_REPLY, meta contexts
 * (LIST / SET), then GO with INFO_NAME / DESCRIPTION / BLOCK_SIZE, falling back to EXPORT_NAME
 * when the server does not know GO. Also LIST of exports. Sequential by nature (one option in
 * flight at a time), so written as async steps over `ByteStream.read`.
 *
 * Bounds: every option reply is at most `LIMITS.maxOptionLength` bytes and one option gets at most
 * `MAX_REPLIES_PER_OPTION` replies; anything else is a ProtocolError.
 */
import { Errno, NbddError } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import {
  LIMITS,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  nameOfNbdOpt,
  nameOfNbdRep,
} from '../wire/constants.js';
import {
  GREETING_LENGTH,
  OPTION_REPLY_HEADER_LENGTH,
  ProtocolError,
  decodeGreeting,
  decodeInfo,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  decodeRepServer,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  isOptionError,
} from '../wire/handshake.js';
import type { ByteStream } from './stream.js';
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';

const log = logger('nbd-client');

/** Replies one option may get before we call the server broken (LIST, META_CONTEXT). */
const MAX_REPLIES_PER_OPTION = 65536;
/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, and 124 zero bytes unless NO_ZEROES. */
const EXPORT_NAME_REPLY_LENGTH = 10;
const EXPORT_NAME_ZEROES = 124;
/** Spec limits on INFO_BLOCK_SIZE (doc/proto.md "Block size constraints"). */
const MAX_MIN_BLOCK_SIZE = 64 * 1024;
/** Defaults when the server sends no INFO_BLOCK_SIZE. */
export const DEFAULT_BLOCK_SIZES = { minimum: 1, preferred: 4096, maximum: LIMITS.maxPayload } as const;

export interface NegotiateOptions {
  exportName: string;
  /** Contexts to select with SET_META_CONTEXT (needs structured replies). */
  metaContexts: string[];
  /** Also ask LIST_META_CONTEXT with no query: every context the export offers. */
  listMetaContexts: boolean;
  /** Ask for structured replies (default in the client: true). */
  structuredReplies: boolean;
  /** Start TLS first (NBD_OPT_STARTTLS) with these options (src/nbd/tls.ts `clientTlsOptions`). */
  tls?: TlsConnectionOptions;
}

export interface ExportInfo {
  /** The export name we asked for (INFO_NAME may give the server's canonical one in `canonicalName`). */
  name: string;
  canonicalName?: string;
  description?: string;
  size: number;
  /** Transmission flags (NBD_FLAG.*). */
  flags: number;
  /** Sizes the server sent in INFO_BLOCK_SIZE, or undefined (then the defaults apply). */
  blockSizes?: { minimum: number; preferred: number; maximum: number };
  minBlockSize: number;
  preferredBlockSize: number;
  /** Largest READ/WRITE payload we will send (the server's maximum, capped at LIMITS.maxPayload). */
  maxPayload: number;
  structuredReplies: boolean;
  /** Selected contexts: name → id for this connection. */
  contexts: Map<string, number>;
  /** Contexts the export offers (when asked with `listMetaContexts`). */
  offeredContexts?: string[];
  /** 'go' or 'export-name': how the transmission phase was entered. */
  entry: 'go' | 'export-name';
  handshakeFlags: number;
}

interface OptionReply {
  type: number;
  data: Buffer;
}

/** Exchanges one option: sends it, hands each non-final reply to `onReply`, returns the final one. */
async function exchange(io: ByteStream, option: number, data: Buffer | undefined, onReply: (r: OptionReply) => void = unexpected(option)): Promise<OptionReply> {
  io.write(encodeOption(option, data));
  for (let count = 0; count < MAX_REPLIES_PER_OPTION; count++) {
    const h = decodeOptionReplyHeader(await io.read(OPTION_REPLY_HEADER_LENGTH));
    if (h.option !== option) throw new ProtocolError(`reply to ${nameOfNbdOpt(h.option)} while ${nameOfNbdOpt(option)} was pending`);
    if (h.length > LIMITS.maxOptionLength) throw new ProtocolError(`${nameOfNbdRep(h.type)} reply of ${h.length} bytes (limit ${LIMITS.maxOptionLength})`);
    const reply = { type: h.type, data: await io.read(h.length) };
    if (reply.type === NBD_REP.ACK || isOptionError(reply.type)) return reply;
    onReply(reply);
  }
  throw new ProtocolError(`more than ${MAX_REPLIES_PER_OPTION} replies to ${nameOfNbdOpt(option)}`);
}

function unexpected(option: number): (r: OptionReply) => void {
  return (r) => {
    throw new ProtocolError(`unexpected ${nameOfNbdRep(r.type)} reply to ${nameOfNbdOpt(option)}`);
  };
}

/** The server's message in an error reply (UTF-8 text, possibly empty). */
function errorText(r: OptionReply): string {
  const text = r.data.toString('utf8').trim();
  return text ? `${nameOfNbdRep(r.type)}: ${text}` : nameOfNbdRep(r.type);
}

/** Maps an option error reply to an NbddError with a matching errno. */
function optionError(option: number, r: OptionReply, what: string): NbddError {
  const errno =
    r.type === NBD_REP.ERR_UNKNOWN ? Errno.ENOENT
    : r.type === NBD_REP.ERR_POLICY ? Errno.EACCES
    : r.type === NBD_REP.ERR_UNSUP || r.type === NBD_REP.ERR_TLS_REQD ? Errno.ENOTSUP
    : r.type === NBD_REP.ERR_SHUTDOWN ? Errno.ESHUTDOWN
    : r.type === NBD_REP.ERR_INVALID ? Errno.EINVAL
    : Errno.EIO;
  const hint = r.type === NBD_REP.ERR_TLS_REQD ? ' (the server requires TLS, which nbdd does not support)' : '';
  return new NbddError(errno, `NBD server refused ${nameOfNbdOpt(option)} for ${what}: ${errorText(r)}${hint}`);
}

/** Greeting and client flags; returns the handshake flags and whether NO_ZEROES was agreed. */
async function greet(io: ByteStream): Promise<{ handshakeFlags: number; noZeroes: boolean }> {
  const { handshakeFlags } = decodeGreeting(await io.read(GREETING_LENGTH));
  const noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
  let clientFlags = 0;
  if (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) clientFlags |= NBD_FLAG_C_FIXED_NEWSTYLE;
  if (noZeroes) clientFlags |= NBD_FLAG_C_NO_ZEROES;
  io.write(encodeClientFlags(clientFlags));
  return { handshakeFlags, noZeroes };
}

/** Negotiates up to the transmission phase. Throws NbddError (the errno says why) or ProtocolError. */
export async function negotiate(io: ByteStream, opts: NegotiateOptions): Promise<ExportInfo> {
  const { handshakeFlags, noZeroes } = await greet(io);
  const fixed = (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  if (opts.tls) {
    if (!fixed) throw new NbddError(Errno.ENOTSUP, `NBD server ${io.peer} is not fixed-newstyle: it cannot start TLS`);
    const r = await exchange(io, NBD_OPT.STARTTLS, undefined);
    if (r.type !== NBD_REP.ACK) throw new NbddError(Errno.EACCES, `NBD server ${io.peer} refused TLS (NBD_OPT_STARTTLS: ${errorText(r)})`);
    await io.startTls(opts.tls);
  }
  const info: ExportInfo = {
    name: opts.exportName,
    size: 0,
    flags: 0,
    minBlockSize: DEFAULT_BLOCK_SIZES.minimum,
    preferredBlockSize: DEFAULT_BLOCK_SIZES.preferred,
    maxPayload: DEFAULT_BLOCK_SIZES.maximum,
    structuredReplies: false,
    contexts: new Map(),
    entry: 'export-name',
    handshakeFlags,
  };
  if (!fixed) {
    // Plain newstyle: EXPORT_NAME is the only option a server without FIXED_NEWSTYLE understands.
    await exportName(io, opts.exportName, noZeroes, info);
    return info;
  }
  if (opts.structuredReplies) {
    const r = await exchange(io, NBD_OPT.STRUCTURED_REPLY, undefined);
    info.structuredReplies = r.type === NBD_REP.ACK;
    if (!info.structuredReplies) log.debug(`${io.peer}: no structured replies (${errorText(r)})`);
  }
  if (info.structuredReplies && opts.listMetaContexts) {
    info.offeredContexts = await metaContexts(io, NBD_OPT.LIST_META_CONTEXT, opts.exportName, []);
  }
  if (info.structuredReplies && opts.metaContexts.length > 0) {
    const ids = new Map<string, number>();
    await metaContexts(io, NBD_OPT.SET_META_CONTEXT, opts.exportName, opts.metaContexts, ids);
    info.contexts = ids;
  }
  let haveExport = false;
  const go = encodeInfoRequest({ exportName: opts.exportName, infos: [NBD_INFO.NAME, NBD_INFO.DESCRIPTION, NBD_INFO.BLOCK_SIZE] });
  const r = await exchange(io, NBD_OPT.GO, go, (reply) => {
    if (reply.type !== NBD_REP.INFO) throw new ProtocolError(`unexpected ${nameOfNbdRep(reply.type)} reply to NBD_OPT_GO`);
    if (applyInfo(info, reply.data) === NBD_INFO.EXPORT) haveExport = true;
  });
  if (r.type === NBD_REP.ERR_UNSUP) {
    log.debug(`${io.peer}: NBD_OPT_GO unsupported; using NBD_OPT_EXPORT_NAME`);
    await exportName(io, opts.exportName, noZeroes, info);
    return info;
  }
  if (r.type !== NBD_REP.ACK) throw optionError(NBD_OPT.GO, r, `export '${opts.exportName}'`);
  if (!haveExport) throw new ProtocolError('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
  info.entry = 'go';
  return info;
}

/**
 * Applies one NBD_REP_INFO payload and returns its type. Block sizes must satisfy the spec's
 * constraints (minimum a power of two ≤ 64 KiB, preferred and maximum ≥ minimum); the maximum
 * payload we use is capped at LIMITS.maxPayload.
 */
function applyInfo(info: ExportInfo, data: Buffer): number | 'unknown' {
  const d = decodeInfo(data);
  switch (d.type) {
    case NBD_INFO.EXPORT:
      info.size = d.size;
      info.flags = d.flags;
      break;
    case NBD_INFO.NAME:
      info.canonicalName = d.name;
      break;
    case NBD_INFO.DESCRIPTION:
      info.description = d.description;
      break;
    case NBD_INFO.BLOCK_SIZE: {
      const { minimum, preferred, maximum } = d;
      const pow2 = minimum > 0 && (minimum & (minimum - 1)) === 0;
      if (!pow2 || minimum > MAX_MIN_BLOCK_SIZE || preferred < minimum || maximum < minimum) {
        throw new ProtocolError(`bad NBD_INFO_BLOCK_SIZE ${minimum}/${preferred}/${maximum}`);
      }
      info.blockSizes = { minimum, preferred, maximum };
      info.minBlockSize = minimum;
      info.preferredBlockSize = preferred;
      // Round the payload limit down to the minimum block size so split requests stay aligned.
      const cap = Math.min(maximum, LIMITS.maxPayload);
      info.maxPayload = cap - (cap % minimum);
      break;
    }
    default:
      log.debug(`ignoring unknown NBD_INFO type ${d.code}`);
  }
  return d.type;
}

async function exportName(io: ByteStream, name: string, noZeroes: boolean, info: ExportInfo): Promise<void> {
  io.write(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from(name, 'utf8')));
  let reply: Buffer;
  try {
    reply = await io.read(EXPORT_NAME_REPLY_LENGTH);
  } catch (err) {
    // The spec's way to refuse EXPORT_NAME is to close the connection.
    throw new NbddError(Errno.ENOENT, `NBD server ${io.peer} closed the connection on export '${name}' (no such export?)`, { cause: err });
  }
  const size = reply.readBigUInt64BE(0);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('export size over 2^53 bytes');
  info.size = Number(size);
  info.flags = reply.readUInt16BE(8);
  if (!noZeroes) await io.read(EXPORT_NAME_ZEROES);
  info.entry = 'export-name';
}

async function metaContexts(io: ByteStream, option: number, name: string, queries: string[], ids?: Map<string, number>): Promise<string[]> {
  const names: string[] = [];
  const r = await exchange(io, option, encodeMetaContextRequest({ exportName: name, queries }), (reply) => {
    if (reply.type !== NBD_REP.META_CONTEXT) throw new ProtocolError(`unexpected ${nameOfNbdRep(reply.type)} reply to ${nameOfNbdOpt(option)}`);
    const c = decodeRepMetaContext(reply.data);
    names.push(c.name);
    ids?.set(c.name, c.id);
  });
  if (r.type !== NBD_REP.ACK) {
    // A server without meta contexts (or this export) answers with an error: nothing selected.
    log.debug(`${io.peer}: ${nameOfNbdOpt(option)} refused (${errorText(r)})`);
    return [];
  }
  return names;
}

export interface ExportListing {
  name: string;
  description: string;
}

/** NBD_OPT_LIST, then NBD_OPT_ABORT. Throws NbddError when the server refuses the list. */
export async function listExports(io: ByteStream): Promise<ExportListing[]> {
  const { handshakeFlags } = await greet(io);
  if (!(handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbddError(Errno.ENOTSUP, `NBD server ${io.peer} cannot list exports (not fixed-newstyle)`);
  const exports: ExportListing[] = [];
  const r = await exchange(io, NBD_OPT.LIST, undefined, (reply) => {
    if (reply.type !== NBD_REP.SERVER) throw new ProtocolError(`unexpected ${nameOfNbdRep(reply.type)} reply to NBD_OPT_LIST`);
    exports.push(decodeRepServer(reply.data));
  });
  if (r.type !== NBD_REP.ACK) throw optionError(NBD_OPT.LIST, r, 'the export list');
  await abort(io);
  return exports;
}

/** NBD_OPT_ABORT: the server may ACK or just close; either ends the negotiation. */
async function abort(io: ByteStream): Promise<void> {
  try {
    await exchange(io, NBD_OPT.ABORT, undefined);
  } catch (err) {
    if (!(err instanceof NbddError) || err.errno !== Errno.ECONNRESET) throw err;
  }
}
