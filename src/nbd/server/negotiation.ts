/**
 * The server's side of NBD negotiation as a pure state machine: no socket, no timer. Bytes go in
 * through a ChunkReader, reply frames come out through `send`, and `advance` says when
 * negotiation has ended — in transmission on an export, or with the connection to be closed.
 * NbdSession feeds it from the socket; tests feed it a script cut at every byte.
 *
 * Bad input: malformed options get the spec's error replies and negotiation goes on; unknown
 * client flags, too many options or an unknown EXPORT_NAME end it (`close`), as does ABORT.
 */
import type { MetaContext } from '../../core/meta-context.js';
import { logger } from '../../core/log.js';
import { LIMITS, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO, NBD_OPT, NBD_REP, nameOfNbdOpt } from '../wire/constants.js';
import {
  CLIENT_FLAGS_LENGTH,
  OPTION_HEADER_LENGTH,
  ProtocolError,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from '../wire/handshake.js';
import type { ChunkReader } from '../wire/reader.js';
import { matchContexts, type NbdExport } from './export.js';

const log = logger('nbd');

/** Where negotiation looks exports up. */
export interface ExportDirectory {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
}

/** How negotiation ended. */
export type NegotiationEnd =
  | { kind: 'transmission'; export: NbdExport; structured: boolean; contexts: MetaContext[] }
  /** `graceful`: what was sent should still reach the client (ABORT, unknown EXPORT_NAME). */
  | { kind: 'close'; reason: string; graceful: boolean }
  /** STARTTLS was accepted (its reply sent): the session starts TLS, then calls `tlsStarted()`. */
  | { kind: 'starttls' };

type Wait =
  | { kind: 'clientFlags' }
  | { kind: 'optionHeader' }
  | { kind: 'optionData'; option: number; length: number }
  | { kind: 'optionSkip'; option: number; remaining: number };

export class Negotiation {
  private wait: Wait = { kind: 'clientFlags' };
  private noZeroes = false;
  private structured = false;
  private optionCount = 0;
  /** Contexts chosen by SET_META_CONTEXT, with the export they were chosen for. */
  private selected: { exportName: string; contexts: MetaContext[] } | null = null;
  private end: NegotiationEnd | null = null;
  private encrypted = false;

  constructor(
    private readonly exports: ExportDirectory,
    private readonly send: (frame: Buffer) => void,
    /** For log lines, e.g. `session 3`. */
    private readonly label = 'negotiation',
    /** Whether STARTTLS is offered (`on`) or needed before anything else (`require`). */
    private readonly tls: 'off' | 'on' | 'require' = 'off',
  ) {}

  /**
   * TLS is up after a `starttls` end: negotiation goes on over it, as if nothing had been
   * negotiated before (the spec: state from before STARTTLS does not carry over).
   */
  tlsStarted(): void {
    this.encrypted = true;
    this.structured = false;
    this.selected = null;
    this.end = null;
  }

  /**
   * Consumes what `reader` holds and can be handled; returns how negotiation ended, or null when
   * it needs more bytes. Bytes after the end stay in `reader` (the first requests, maybe).
   */
  advance(reader: ChunkReader): NegotiationEnd | null {
    while (!this.end) {
      try {
        if (!this.step(reader)) return null;
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        this.end = { kind: 'close', reason: err.message, graceful: false };
      }
    }
    return this.end;
  }

  /** Handles one unit of input if enough bytes are buffered; false when it must wait. */
  private step(r: ChunkReader): boolean {
    const w = this.wait;
    switch (w.kind) {
      case 'clientFlags': {
        if (r.length < CLIENT_FLAGS_LENGTH) return false;
        const flags = r.consume(CLIENT_FLAGS_LENGTH).readUInt32BE(0);
        if ((flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
          throw new ProtocolError(`unknown client flags 0x${flags.toString(16)}`);
        }
        this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.wait = { kind: 'optionHeader' };
        return true;
      }
      case 'optionHeader': {
        if (r.length < OPTION_HEADER_LENGTH) return false;
        const { option, length } = decodeOptionHeader(r.consume(OPTION_HEADER_LENGTH));
        if (++this.optionCount > LIMITS.maxOptions) throw new ProtocolError(`more than ${LIMITS.maxOptions} options`);
        this.wait = length > LIMITS.maxOptionLength ? { kind: 'optionSkip', option, remaining: length } : { kind: 'optionData', option, length };
        return true;
      }
      case 'optionSkip': {
        w.remaining -= r.skip(w.remaining);
        if (w.remaining > 0) return false;
        this.wait = { kind: 'optionHeader' };
        this.replyOptionError(w.option, NBD_REP.ERR_TOO_BIG, 'option data too long');
        return true;
      }
      case 'optionData': {
        if (r.length < w.length) return false;
        const data = r.consume(w.length);
        this.wait = { kind: 'optionHeader' };
        this.handleOption(w.option, data);
        return true;
      }
    }
  }

  private handleOption(option: number, data: Buffer): void {
    log.debug(`${this.label}: ${nameOfNbdOpt(option)} (${data.length} bytes)`);
    if (this.tls === 'require' && !this.encrypted && option !== NBD_OPT.STARTTLS && option !== NBD_OPT.ABORT) {
      if (option === NBD_OPT.EXPORT_NAME) {
        this.end = { kind: 'close', reason: 'EXPORT_NAME before TLS on a server that requires TLS', graceful: false };
        return;
      }
      return this.replyOptionError(option, NBD_REP.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
    }
    try {
      switch (option) {
        case NBD_OPT.STARTTLS:
          if (data.length !== 0) return this.replyOptionError(option, NBD_REP.ERR_INVALID, 'STARTTLS takes no data');
          if (this.tls === 'off') return this.replyOptionError(option, NBD_REP.ERR_UNSUP, 'TLS is not configured on this server');
          if (this.encrypted) return this.replyOptionError(option, NBD_REP.ERR_INVALID, 'TLS is already on');
          this.send(encodeOptionReply(option, NBD_REP.ACK));
          this.end = { kind: 'starttls' };
          return;
        case NBD_OPT.EXPORT_NAME:
          return this.handleOptExportName(data);
        case NBD_OPT.ABORT:
          this.send(encodeOptionReply(option, NBD_REP.ACK));
          this.end = { kind: 'close', reason: 'the client aborted', graceful: true };
          return;
        case NBD_OPT.LIST:
          return this.handleOptList(data);
        case NBD_OPT.INFO:
        case NBD_OPT.GO:
          return this.handleOptInfoGo(option, data);
        case NBD_OPT.STRUCTURED_REPLY:
          if (data.length !== 0) return this.replyOptionError(option, NBD_REP.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
          this.structured = true;
          return this.send(encodeOptionReply(option, NBD_REP.ACK));
        case NBD_OPT.LIST_META_CONTEXT:
        case NBD_OPT.SET_META_CONTEXT:
          return this.handleOptMetaContext(option, data);
        default:
          return this.replyOptionError(option, NBD_REP.ERR_UNSUP, `${nameOfNbdOpt(option)} is not supported`);
      }
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.replyOptionError(option, NBD_REP.ERR_INVALID, err.message);
    }
  }

  private handleOptExportName(data: Buffer): void {
    const name = data.toString('utf8');
    const exp = this.exports.findExport(name);
    if (!exp) {
      log.warn(`${this.label}: client asked for unknown export '${name}'; closing`);
      this.end = { kind: 'close', reason: `unknown export '${name}'`, graceful: true };
      return;
    }
    this.send(encodeExportNameReply(exp.size, exp.transmissionFlags(this.structured), this.noZeroes));
    this.enterTransmission(exp);
  }

  private handleOptList(data: Buffer): void {
    if (data.length !== 0) return this.replyOptionError(NBD_OPT.LIST, NBD_REP.ERR_INVALID, 'LIST takes no data');
    for (const exp of this.exports.listExports()) {
      this.send(encodeOptionReply(NBD_OPT.LIST, NBD_REP.SERVER, encodeRepServer(exp.name, exp.description)));
    }
    this.send(encodeOptionReply(NBD_OPT.LIST, NBD_REP.ACK));
  }

  private handleOptInfoGo(option: number, data: Buffer): void {
    const req = decodeInfoRequest(data);
    const exp = this.exports.findExport(req.exportName);
    if (!exp) return this.replyOptionError(option, NBD_REP.ERR_UNKNOWN, `no export named '${req.exportName}'`);
    const reply = (info: Buffer): void => this.send(encodeOptionReply(option, NBD_REP.INFO, info));
    reply(encodeInfoExport(exp.size, exp.transmissionFlags(this.structured)));
    if (req.infos.includes(NBD_INFO.NAME)) reply(encodeInfoString(NBD_INFO.NAME, exp.name));
    if (req.infos.includes(NBD_INFO.DESCRIPTION) && exp.description) reply(encodeInfoString(NBD_INFO.DESCRIPTION, exp.description));
    reply(encodeInfoBlockSize(exp.minBlockSize, exp.preferredBlockSize, exp.maxPayload));
    this.send(encodeOptionReply(option, NBD_REP.ACK));
    if (option === NBD_OPT.GO) this.enterTransmission(exp);
  }

  private handleOptMetaContext(option: number, data: Buffer): void {
    const list = option === NBD_OPT.LIST_META_CONTEXT;
    if (!this.structured) {
      if (!list) this.selected = null;
      return this.replyOptionError(option, NBD_REP.ERR_INVALID, 'meta contexts need structured replies first');
    }
    const req = decodeMetaContextRequest(data);
    const exp = this.exports.findExport(req.exportName);
    if (!exp) {
      if (!list) this.selected = null;
      return this.replyOptionError(option, NBD_REP.ERR_UNKNOWN, `no export named '${req.exportName}'`);
    }
    const available = exp.contexts();
    let chosen: MetaContext[];
    if (list && req.queries.length === 0) chosen = available;
    else {
      chosen = [];
      for (const q of req.queries) {
        for (const c of matchContexts(available, q, list)) if (!chosen.includes(c)) chosen.push(c);
      }
    }
    chosen.forEach((c, i) => this.send(encodeOptionReply(option, NBD_REP.META_CONTEXT, encodeRepMetaContext(list ? 0 : i, c.name))));
    if (!list) this.selected = { exportName: exp.name, contexts: chosen };
    this.send(encodeOptionReply(option, NBD_REP.ACK));
  }

  private replyOptionError(option: number, type: number, message: string): void {
    log.debug(`${this.label}: ${nameOfNbdOpt(option)} refused: ${message}`);
    this.send(encodeOptionError(option, type, message));
  }

  private enterTransmission(exp: NbdExport): void {
    const contexts = this.selected && this.selected.exportName === exp.name ? this.selected.contexts : [];
    this.end = { kind: 'transmission', export: exp, structured: this.structured, contexts };
  }
}
