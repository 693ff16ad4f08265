/**
 * NBD client: one connection to an NBD server, negotiated (see `negotiate.ts`), then many
 * requests in flight at once (cookie → `PendingReply`), replies parsed incrementally by
 * `ReplyParser` as bytes arrive.
 *
 * Contract:
 * - Requests larger than the server's maximum payload are split (READ/WRITE), and payload-less
 *   ones (TRIM, WRITE_ZEROES, CACHE) are split below 4 GiB; pieces go out in parallel.
 * - In strict mode (the default) requests the export cannot take (out of range, misaligned to the
 *   server's minimum block size, a command or flag it did not advertise, a write to a read-only
 *   export) are refused locally with EINVAL / ENOTSUP / EPERM before anything is sent, as
 *   libnbd's strict mode does. `strict: false` sends them anyway (tests of server errors).
 * - Error replies reject with NbddError carrying the server's errno; a broken reply or a lost
 *   connection rejects every request in flight (EPROTO / ECONNRESET) and the client is dead.
 * - `read` returns a fresh Buffer owned by the caller (large ones from `requestBuffers`, which the
 *   NBD server recycles once it has sent them); `write`'s buffer must not change until the
 *   promise settles.
 */
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import { requestBuffers } from '../../core/request-buffers.js';
import { tryCall } from '../../core/try-call.js';
import type { StatusExtent } from '../../core/meta-context.js';
import type { WriteOptions, ZeroOptions } from '../../core/backend.js';
import type { NbdTransport } from '../uri.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, nameOfNbdCmd } from '../wire/constants.js';
import { ProtocolError } from '../wire/handshake.js';
import { encodeRequest } from '../wire/transmission.js';
import { listExports, negotiate, type ExportInfo, type ExportListing } from './negotiate.js';
import { CookieTable } from './cookies.js';
import { PendingReply, ReplyParser, type ReplyTarget } from './replies.js';
import { ByteStream } from './stream.js';

export type { ExportInfo, ExportListing } from './negotiate.js';

const log = logger('nbd-client');

/** Largest length field of a compact request (u32). */
const MAX_REQUEST_LENGTH = 0xffff_ffff;
/** Most requests in flight on one connection. */
const MAX_IN_FLIGHT = 1 << 16;

export interface NbdClientOptions {
  /** Export to open; '' is the default export. */
  exportName?: string;
  /** Meta contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:b0`. */
  metaContexts?: string[];
  /** Also fetch the list of contexts the export offers (`info.offeredContexts`). */
  listMetaContexts?: boolean;
  /** Ask for structured replies (default true; needed for meta contexts and sparse reads). */
  structuredReplies?: boolean;
  /** Refuse requests the export did not advertise before sending them (default true). */
  strict?: boolean;
  /** Milliseconds for connect plus negotiation (default 30 s). */
  timeoutMs?: number;
  /** TLS first (nbds:// URIs): options for `tls.connect` (src/nbd/tls.ts `clientTlsOptions`). */
  tls?: TlsConnectionOptions;
}

const DEFAULT_TIMEOUT_MS = 30_000;

async function withHandshake<T>(t: NbdTransport, timeoutMs: number, body: (io: ByteStream) => Promise<T>): Promise<{ io: ByteStream; value: T }> {
  const io = await ByteStream.connect(t, timeoutMs);
  const timer = setTimeout(() => io.destroy(new NbddError(Errno.ETIMEDOUT, `NBD negotiation with ${io.peer} timed out after ${timeoutMs} ms`)), timeoutMs);
  try {
    return { io, value: await body(io) };
  } catch (err) {
    io.destroy(new NbddError(Errno.ECONNRESET, 'negotiation failed'));
    if (err instanceof ProtocolError) throw new NbddError(Errno.EPROTO, `NBD server ${io.peer}: ${err.message}`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/** A request in flight: its reply as it arrives, and what settles its promise. */
interface InFlight {
  reply: PendingReply;
  resolve: (reply: PendingReply) => void;
  reject: (err: Error) => void;
}

const noop = (): void => undefined;

export class NbdClient implements ReplyTarget {
  /** Requests in flight by cookie, with what settles each. */
  private readonly pending = new CookieTable<InFlight>();
  private readonly parser = new ReplyParser(this);
  private disconnecting = false;
  private readonly strict: boolean;

  private constructor(
    private readonly io: ByteStream,
    /** What negotiation established; read-only for callers. */
    readonly info: ExportInfo,
    options: NbdClientOptions,
  ) {
    this.strict = options.strict ?? true;
    io.onBytes = this.onBytes;
    io.sink = { target: (min) => this.parser.directTarget(io.reader, min), filled: (n) => this.parser.directFilled(n) };
    io.onClose = (err) => this.failAll(err);
  }

  /** Connects and negotiates. Throws NbddError (ENOENT for an unknown export, ECONNREFUSED, EPROTO, ...). */
  static async connect(t: NbdTransport, options: NbdClientOptions = {}): Promise<NbdClient> {
    const { io, value: info } = await withHandshake(t, options.timeoutMs ?? DEFAULT_TIMEOUT_MS, (io) =>
      negotiate(io, {
        exportName: options.exportName ?? '',
        metaContexts: options.metaContexts ?? [],
        listMetaContexts: !!options.listMetaContexts,
        structuredReplies: options.structuredReplies ?? true,
        tls: options.tls,
      }),
    );
    log.debug(`${io.peer}: export '${info.name}' size ${info.size} flags 0x${info.flags.toString(16)} via ${info.entry}`);
    return new NbdClient(io, info, options);
  }

  /** The exports a server lists (NBD_OPT_LIST), on a connection of its own. */
  static async list(t: NbdTransport, options: { timeoutMs?: number } = {}): Promise<ExportListing[]> {
    const { io, value } = await withHandshake(t, options.timeoutMs ?? DEFAULT_TIMEOUT_MS, listExports);
    await io.end();
    return value;
  }

  get size(): number {
    return this.info.size;
  }

  /** True when the server set `flag` (an NBD_FLAG bit) for this export. */
  has(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }

  /** Why the connection is gone (closed by the peer or the network, or broken), or null while it is up. */
  get lost(): NbddError | null {
    return this.disconnecting ? null : (this.io.error ?? null);
  }

  private lostResolve: (err: NbddError) => void = () => undefined;
  /** Drops the connection now (a request took too long): everything in flight fails with `reason`. */
  abort(reason: NbddError): void {
    this.io.destroy(reason);
  }

  /** Resolves when the connection goes away other than by `close()`. */
  readonly whenLost: Promise<NbddError> = new Promise((resolve) => (this.lostResolve = resolve));

  /** Requests in flight (pieces of split requests count one each). */
  get inFlight(): number {
    return this.pending.size;
  }

  /* ------------------------------------------------------------ commands */

  // read and write are on every request's path: plain functions returning one request's promise
  // when it fits one payload (an async frame and the split would add promises and microtasks).

  /** Reads `length` bytes at `offset` into a new Buffer (the caller's). */
  read(offset: number, length: number): Promise<Buffer> {
    return tryCall(() => {
      this.check(NBD_CMD.READ, 0, offset, length);
      const out = requestBuffers.take(length);
      if (length === 0) return out;
      if (length <= this.info.maxPayload) return this.submit(NBD_CMD.READ, 0, offset, length, out).then(() => out);
      return this.split(offset, length, this.info.maxPayload, (o, l) => this.submit(NBD_CMD.READ, 0, o, l, out.subarray(o - offset, o - offset + l))).then(() => out);
    });
  }

  write(offset: number, data: Buffer, options: WriteOptions = {}): Promise<void> {
    return tryCall<void>(() => {
      const flags = options.fua ? NBD_CMD_FLAG.FUA : 0;
      this.check(NBD_CMD.WRITE, flags, offset, data.length);
      if (data.length === 0) return undefined;
      if (data.length <= this.info.maxPayload) return this.submit(NBD_CMD.WRITE, flags, offset, data.length, null, data).then(noop);
      return this.split(offset, data.length, this.info.maxPayload, (o, l) => this.submit(NBD_CMD.WRITE, flags, o, l, null, data.subarray(o - offset, o - offset + l)));
    });
  }

  async flush(): Promise<void> {
    this.check(NBD_CMD.FLUSH, 0, 0, 0);
    await this.submit(NBD_CMD.FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    const flags = options.fua ? NBD_CMD_FLAG.FUA : 0;
    this.check(NBD_CMD.TRIM, flags, offset, length);
    await this.split(offset, length, this.maxEffectLength, (o, l) => this.submit(NBD_CMD.TRIM, flags, o, l));
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    const flags =
      (options.fua ? NBD_CMD_FLAG.FUA : 0) | (options.noHole ? NBD_CMD_FLAG.NO_HOLE : 0) | (options.fastZero ? NBD_CMD_FLAG.FAST_ZERO : 0);
    this.check(NBD_CMD.WRITE_ZEROES, flags, offset, length);
    await this.split(offset, length, this.maxEffectLength, (o, l) => this.submit(NBD_CMD.WRITE_ZEROES, flags, o, l));
  }

  async cache(offset: number, length: number): Promise<void> {
    this.check(NBD_CMD.CACHE, 0, offset, length);
    await this.split(offset, length, this.maxEffectLength, (o, l) => this.submit(NBD_CMD.CACHE, 0, o, l));
  }

  /**
   * Block status of every selected context for `[offset, offset + length)`: extents start at
   * `offset`, cover at least one byte, and may end before `offset + length` (ask again from
   * there) — the server decides. With `reqOne`, one extent per context.
   */
  async blockStatus(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<Map<string, StatusExtent[]>> {
    const flags = options.reqOne ? NBD_CMD_FLAG.REQ_ONE : 0;
    this.check(NBD_CMD.BLOCK_STATUS, flags, offset, length);
    const reply = await this.submit(NBD_CMD.BLOCK_STATUS, flags, offset, Math.min(length, this.maxEffectLength));
    const byName = new Map<string, StatusExtent[]>();
    for (const [name, id] of this.info.contexts) {
      const flat = reply.status.get(id);
      if (!flat) throw new NbddError(Errno.EPROTO, `NBD server sent no extents for ${name} in ${reply.description}`);
      const extents: StatusExtent[] = [];
      for (let i = 0; i < flat.length; i += 2) extents.push({ length: flat[i]!, flags: flat[i + 1]! });
      byName.set(name, extents);
    }
    const known = new Set(this.info.contexts.values());
    for (const id of reply.status.keys()) {
      if (!known.has(id)) throw new NbddError(Errno.EPROTO, `NBD server sent extents for unknown context id ${id}`);
    }
    return byName;
  }

  /**
   * Sends NBD_CMD_DISC once every request in flight has settled, then closes the connection.
   * Requests made after `close()` fail with ESHUTDOWN. Idempotent.
   */
  async close(): Promise<void> {
    if (this.disconnecting) return this.io.closed;
    this.disconnecting = true;
    while (this.pending.size > 0 && !this.io.error) await this.nextSettle();
    if (!this.io.error) this.io.write(encodeRequest({ flags: 0, type: NBD_CMD.DISC, cookieHi: 0, cookieLo: 0, offset: 0, length: 0 }));
    await this.io.end();
  }

  /* ------------------------------------------------------------ internals */

  /** Largest aligned length a payload-less request carries (below the u32 length field). */
  private get maxEffectLength(): number {
    const min = this.info.minBlockSize;
    return MAX_REQUEST_LENGTH - (MAX_REQUEST_LENGTH % min);
  }

  /** Local checks before sending (strict mode), else nothing. Throws NbddError. */
  private check(type: number, flags: number, offset: number, length: number): void {
    if (this.disconnecting) throw new NbddError(Errno.ESHUTDOWN, `${nameOfNbdCmd(type)} after close()`);
    if (this.io.error) throw this.io.error;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new NbddError(Errno.EINVAL, `${nameOfNbdCmd(type)}: bad range ${offset}+${length}`);
    }
    if (!this.strict) return;
    const need = (flag: number, what: string): void => {
      if (!this.has(flag)) throw new NbddError(Errno.ENOTSUP, `NBD export does not support ${what}`);
    };
    const writes = type === NBD_CMD.WRITE || type === NBD_CMD.TRIM || type === NBD_CMD.WRITE_ZEROES;
    if (writes && this.has(NBD_FLAG.READ_ONLY)) throw new NbddError(Errno.EPERM, `${nameOfNbdCmd(type)} on a read-only NBD export`);
    if (type === NBD_CMD.FLUSH) need(NBD_FLAG.SEND_FLUSH, 'FLUSH');
    if (type === NBD_CMD.TRIM) need(NBD_FLAG.SEND_TRIM, 'TRIM');
    if (type === NBD_CMD.WRITE_ZEROES) need(NBD_FLAG.SEND_WRITE_ZEROES, 'WRITE_ZEROES');
    if (type === NBD_CMD.CACHE) need(NBD_FLAG.SEND_CACHE, 'CACHE');
    if (flags & NBD_CMD_FLAG.FUA) need(NBD_FLAG.SEND_FUA, 'FUA');
    if (flags & NBD_CMD_FLAG.FAST_ZERO) need(NBD_FLAG.SEND_FAST_ZERO, 'FAST_ZERO');
    if (type === NBD_CMD.BLOCK_STATUS && (this.info.contexts.size === 0 || length === 0)) {
      throw new NbddError(Errno.EINVAL, length === 0 ? 'BLOCK_STATUS of 0 bytes' : 'BLOCK_STATUS without a selected meta context');
    }
    if (type === NBD_CMD.FLUSH) return;
    if (offset + length > this.info.size) {
      throw new NbddError(Errno.EINVAL, `${nameOfNbdCmd(type)} ${offset}+${length} past the end of the export (${this.info.size} bytes)`);
    }
    const min = this.info.minBlockSize;
    if (min > 1 && (offset % min !== 0 || length % min !== 0)) {
      throw new NbddError(Errno.EINVAL, `${nameOfNbdCmd(type)} ${offset}+${length} not aligned to the export's ${min}-byte blocks`);
    }
  }

  /** Runs `piece` over `[offset, offset + length)` in pieces of at most `max` bytes, in parallel. */
  private async split(offset: number, length: number, max: number, piece: (offset: number, length: number) => Promise<unknown>): Promise<void> {
    if (length <= max) {
      await piece(offset, length);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += max) parts.push(piece(offset + at, Math.min(max, length - at)));
    await Promise.all(parts);
  }

  /** Sends one request; resolves with its reply when the last chunk arrived and it succeeded. */
  private submit(type: number, flags: number, offset: number, length: number, dest: Buffer | null = null, payload?: Buffer): Promise<PendingReply> {
    if (this.io.error) return Promise.reject(this.io.error);
    if (this.pending.size >= MAX_IN_FLIGHT) return Promise.reject(new NbddError(Errno.EAGAIN, `more than ${MAX_IN_FLIGHT} NBD requests in flight`));
    let reply!: PendingReply;
    const done = new Promise<PendingReply>((resolve, reject) => {
      const entry: InFlight = { reply: null!, resolve, reject };
      const slot = this.pending.add(entry);
      reply = entry.reply = new PendingReply(type, offset, length, this.pending.generation(slot), slot, dest);
    });
    this.io.write(encodeRequest({ flags, type, cookieHi: reply.cookieHi, cookieLo: reply.cookieLo, offset, length }));
    if (payload) this.io.write(payload);
    return done;
  }

  lookup(cookieHi: number, cookieLo: number): PendingReply | undefined {
    return this.pending.get(cookieHi, cookieLo)?.reply;
  }

  done(reply: PendingReply): void {
    const s = this.pending.delete(reply.cookieLo)!;
    try {
      reply.check();
      s.resolve(reply);
    } catch (err) {
      s.reject(err as Error);
    }
    this.wakeSettleWaiters();
  }

  private readonly onBytes = (): void => {
    try {
      this.parser.pump(this.io.reader);
    } catch (err) {
      const reason = new NbddError(Errno.EPROTO, `NBD server ${this.io.peer} broke the protocol: ${messageOf(err)}`);
      log.warn(reason.message);
      this.io.destroy(reason);
    }
  };

  /** Rejects everything in flight: the connection is gone. */
  private failAll(err: NbddError): void {
    if (this.pending.size > 0 && !this.disconnecting) log.debug(`${err.message}; failing ${this.pending.size} requests`);
    if (!this.disconnecting) this.lostResolve(err);
    const failed = this.pending.takeAll();
    for (const s of failed) s.reject(err);
    this.wakeSettleWaiters();
  }

  private settleWaiters: (() => void)[] = [];

  private nextSettle(): Promise<void> {
    return new Promise((resolve) => this.settleWaiters.push(resolve));
  }

  private wakeSettleWaiters(): void {
    const waiters = this.settleWaiters;
    this.settleWaiters = [];
    for (const w of waiters) w();
  }
}
