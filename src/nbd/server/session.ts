/**
 * One NBD connection, server side: negotiation, then transmission, through the export's
 * BlockQueue — framing, admission and flow control; what each reply looks like on the wire is
 * replies.ts. The only module of the server that touches a socket.
 *
 * States (`phase`): handshake → transmission → draining → closed. Within a phase, `wait` says which
 * bytes the parser needs next; `pump()` consumes as much as the buffered bytes allow.
 *
 * Bad input: malformed options get the spec's error replies; a bad request magic, a WRITE payload
 * we will not buffer, or anything that loses framing closes the connection; a failed backend call
 * is an error reply. Nothing here can throw into the event loop.
 */
import type { Socket } from 'node:net';
import { messageOf } from '../../core/errors.js';
import type { MetaContext } from '../../core/meta-context.js';
import { logger } from '../../core/log.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_ERR, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, nameOfNbdCmd } from '../wire/constants.js';
import { ProtocolError, encodeGreeting } from '../wire/handshake.js';
import { TurnWriter } from '../turn-writer.js';
import { ChunkReader } from '../wire/reader.js';
import { REQUEST_HEADER_LENGTH, decodeRequest, type RequestHeader } from '../wire/transmission.js';
import type { NbdExport } from './export.js';
import { Negotiation, type ExportDirectory } from './negotiation.js';
import { validateRequest } from './requests.js';
import { ReplyWriter } from './replies.js';
import { upgradeToTls, type ServerTls } from '../tls.js';
import { ReadSlab, spliceTarget, type SlabReads } from '../read-slab.js';
import { BudgetShare, SMALL_READ, type ReplyBudget } from './reply-budget.js';
import { requestBuffers } from '../../core/request-buffers.js';
import { pipes, type Pipe } from '../../io/pipes.js';
import { OWN_PAYLOAD_MIN, PayloadSplice, dropPayload } from './spliced-payload.js';

const log = logger('nbd');

/** What the server lends a session: export lookup and its own bookkeeping. */
export interface SessionHost extends ExportDirectory {
  /** Called once when the session has fully closed. */
  sessionClosed(session: NbdSession): void;
}

export interface SessionOptions {
  /** Milliseconds to finish negotiation before the connection is dropped (0 = no limit). */
  handshakeTimeoutMs: number;
  /**
   * Stop taking requests while this many bytes of replies are being prepared (READ data in
   * flight) or wait in the socket. Default 32 MiB.
   */
  maxPendingReplyBytes?: number;
  /** The server's budget for READ data of all its clients (none for kernel sockets). */
  replyBudget?: ReplyBudget;
  /** TLS the client may (or must) start with NBD_OPT_STARTTLS; none: STARTTLS is refused. */
  tls?: ServerTls | null;
  /**
   * Splice large WRITE payloads from the socket into pipes (spliced-payload.ts): for the kernel's
   * socketpairs, where it measured faster; a client's large sends measured slower spliced.
   */
  splicePayloads?: boolean;
}

const DEFAULT_MAX_PENDING_REPLY_BYTES = 32 * 1024 * 1024;

type Phase = 'handshake' | 'transmission' | 'draining' | 'closed';

type Wait =
  /** Negotiating: the bytes go to `negotiation`. */
  | { kind: 'negotiation' }
  | { kind: 'request' }
  /** `buf`: a large payload's own buffer, filled as bytes arrive (else a view of the input). */
  | { kind: 'payload'; header: RequestHeader; error: number; buf: Buffer | null; filled: number }
  /** A READ waiting for room in the server's reply budget. */
  | { kind: 'admission'; header: RequestHeader }
  /** A WRITE's payload being spliced into a pipe, with the socket paused (spliced-payload.ts). */
  | { kind: 'spliced'; splice: PayloadSplice };

let nextSessionId = 1;

export class NbdSession {
  readonly id = nextSessionId++;
  private phase: Phase = 'handshake';
  private wait: Wait = { kind: 'negotiation' };
  private readonly reader = new ChunkReader();
  private readonly out: TurnWriter;
  private readonly replies: ReplyWriter;
  private readonly negotiation: Negotiation;
  /** Contexts selected for the export (SET_META_CONTEXT), in context-id order. */
  private contexts: MetaContext[] = [];
  private export: NbdExport | null = null;
  private inFlight = 0;
  /** Counts requests received and completed: the idle sweep (server.ts) sees whether it moved. */
  activity = 0;
  /** This session's part of the server's reply budget (none for kernel sockets). */
  private readonly share: BudgetShare | null;
  private blocked = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private unsubscribeDrain: (() => void) | null = null;
  private closedResolve!: () => void;
  /** Resolves when the connection has closed and every reply was sent or abandoned. */
  readonly closed: Promise<void> = new Promise((r) => (this.closedResolve = r));

  /** With `overSlab`: where socket reads land (else Node's stream delivers 'data' chunks). */
  private readonly slab: ReadSlab | null;
  /** With `overSlab`: the payload buffer handed out for the next read, when it is one. */
  private payloadTarget: Buffer | null = null;

  constructor(
    private socket: Socket,
    private readonly host: SessionHost,
    private readonly options: SessionOptions,
    slab: ReadSlab | null = null,
  ) {
    // A socket that reads into a slab stays plain (no STARTTLS): READ data may be spliced into it.
    this.out = new TurnWriter(socket, slab ? spliceTarget(socket) : -1);
    this.replies = new ReplyWriter(this.out, () => this.phase === 'closed', () => this.description);
    this.negotiation = new Negotiation(host, (frame) => this.replies.send(frame), `session ${this.id}`, options.tls?.mode ?? 'off');
    this.slab = slab;
    // A release may let a session blocked on its own share go on.
    this.share = options.replyBudget ? new BudgetShare(options.replyBudget, () => this.unblock()) : null;
    socket.setNoDelay?.(true);
    if (!slab) socket.on('data', this.onData);
    socket.on('error', (err) => {
      log.debug(`session ${this.id}: socket error: ${err.message}`);
      this.terminate();
    });
    socket.on('close', () => this.terminate());
    socket.on('drain', this.onSocketDrain);
  }

  get description(): string {
    return this.export ? `session ${this.id} (${this.export.name || 'default export'})` : `session ${this.id}`;
  }

  /**
   * A session whose socket reads skip Node's stream: they land in a slab (`ReadSlab`), or straight
   * in a large WRITE's payload buffer, so a payload is copied once, by the kernel, and reads
   * allocate nothing. `open` makes the socket (`slabSocket` over a kernel socketpair end,
   * `slabSocketFrom` over an accepted connection); null when it cannot.
   */
  static overSlab(open: (reads: SlabReads) => Socket | null, host: SessionHost, options: SessionOptions): NbdSession | null {
    const slab = new ReadSlab();
    let session: NbdSession | null = null;
    const socket = open({
      buffer: () => (session ? session.nextReadBuffer() : slab.region()), // the first read may come before the session
      landed: (n, buf) => session!.landed(n, buf),
    });
    if (!socket) return null;
    session = new NbdSession(socket, host, options, slab);
    return session;
  }

  /** Server side of a fresh connection: send the greeting and negotiate. */
  startHandshake(): void {
    if (this.options.handshakeTimeoutMs > 0) {
      this.handshakeTimer = setTimeout(() => {
        log.warn(`${this.description}: negotiation not finished in ${this.options.handshakeTimeoutMs} ms; dropping`);
        this.terminate();
      }, this.options.handshakeTimeoutMs);
      this.handshakeTimer.unref();
    }
    this.replies.send(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  }

  /**
   * A socket already in the transmission phase (a socketpair handed to the kernel): no
   * negotiation, simple replies only.
   */
  startTransmission(exp: NbdExport): void {
    this.enterTransmission(exp);
    this.pump();
  }

  /** Stop taking requests, answer those in flight, then close. */
  shutdown(): Promise<void> {
    if (this.phase === 'handshake') this.terminate();
    else if (this.phase === 'transmission') this.beginDraining();
    return this.closed;
  }

  /* ------------------------------------------------------------ input */

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closed' || this.phase === 'draining') return;
    this.reader.push(chunk);
    this.pump();
  };

  /** `overSlab`: the buffer the next socket read fills. */
  private nextReadBuffer(): Buffer {
    const w = this.wait;
    // Everything buffered was consumed by pump(), so the payload's next bytes are the socket's.
    if (w.kind === 'payload' && w.buf && this.reader.length === 0 && this.phase === 'transmission') {
      this.payloadTarget = w.buf.subarray(w.filled);
      return this.payloadTarget;
    }
    this.payloadTarget = null;
    return this.slab!.region();
  }

  /** `overSlab`: `n` bytes arrived in `buf`, the last buffer `nextReadBuffer` returned. */
  private landed(n: number, buf: Uint8Array): void {
    if (buf !== this.payloadTarget) return this.slab!.deliver(n, this.reader, this.onData);
    this.payloadTarget = null;
    (this.wait as Extract<Wait, { kind: 'payload' }>).filled += n;
    if (this.phase === 'closed' || this.phase === 'draining') return;
    this.pump();
  }

  private pump(): void {
    try {
      while (this.phase === 'handshake' || this.phase === 'transmission') {
        if (!this.step()) break;
      }
    } catch (err) {
      if (err instanceof ProtocolError) log.warn(`${this.description}: ${err.message}; closing`);
      else log.error(`${this.description}: ${messageOf(err)}; closing${process.env.NBDD_DEBUG ? `\n${(err as Error).stack}` : ''}`);
      // Framing is lost, but the requests before the bad frame were sound: answer them first.
      if (err instanceof ProtocolError && this.phase === 'transmission') this.beginDraining();
      else this.terminate();
    }
  }

  /** Handles one unit of input if enough bytes are buffered; false when it must wait. */
  private step(): boolean {
    const r = this.reader;
    const w = this.wait;
    switch (w.kind) {
      case 'negotiation': {
        const end = this.negotiation.advance(r);
        if (!end) return false;
        if (end.kind === 'close') {
          if (end.graceful) this.close();
          else {
            log.warn(`${this.description}: ${end.reason}; closing`);
            this.terminate();
          }
          return false;
        }
        if (end.kind === 'starttls') {
          this.startTls();
          return false;
        }
        this.replies.structured = end.structured;
        this.contexts = end.contexts;
        this.enterTransmission(end.export);
        return true;
      }
      case 'request': {
        if (this.blocked || this.mustWait()) return false;
        if (r.length < REQUEST_HEADER_LENGTH) return false;
        const header = r.decode(REQUEST_HEADER_LENGTH, decodeRequest);
        this.handleRequestHeader(header);
        return true;
      }
      case 'admission': {
        if (this.blocked) return false;
        this.wait = { kind: 'request' };
        this.handleRequestHeader(w.header);
        return true;
      }
      case 'payload': {
        let data: Buffer;
        if (w.buf) {
          if (r.length > 0) w.filled += r.consumeInto(w.buf, w.filled, w.buf.length - w.filled);
          if (w.filled < w.buf.length) return false;
          data = w.buf;
        } else {
          if (r.length < w.header.length) return false;
          data = r.consume(w.header.length);
        }
        this.wait = { kind: 'request' };
        if (w.error) this.replies.error(w.header, w.error, 'write refused');
        else this.handleWrite(w.header, data);
        return true;
      }
      case 'spliced':
        return false;
    }
  }

  /* ------------------------------------------------------------ transmission */

  /**
   * After the STARTTLS reply: the STARTTLS reply leaves in plaintext, then the socket is handed to
   * TLS (bytes the client sent early go with it) and negotiation resumes once the handshake is
   * done. All of it happens in this turn, so no plaintext 'data' event falls in between.
   */
  private startTls(): void {
    this.socket = upgradeToTls(this.socket, this.options.tls!, this.reader, this.out, {
      onData: this.onData,
      onDrain: this.onSocketDrain,
      onGone: () => this.terminate(),
      onSecure: () => {
        this.negotiation.tlsStarted();
        this.pump();
      },
      label: this.description,
    });
  }

  private enterTransmission(exp: NbdExport): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.export = exp;
    this.phase = 'transmission';
    this.wait = { kind: 'request' };
    this.unsubscribeDrain = exp.queue.onDrain(this.onQueueDrain);
    log.debug(`${this.description}: transmission (structured=${this.replies.structured})`);
  }

  private handleRequestHeader(h: RequestHeader): void {
    this.activity++;
    const exp = this.export!;
    if (h.type === NBD_CMD.DISC) {
      log.debug(`${this.description}: NBD_CMD_DISC`);
      return this.beginDraining();
    }
    const { size, readOnly, minBlockSize, maxPayload } = exp;
    const error = validateRequest(h, { size, readOnly, minBlockSize, maxPayload, structured: this.replies.structured, contexts: this.contexts.length });
    if (h.type === NBD_CMD.WRITE) {
      if (h.length > exp.maxPayload) {
        // We will not buffer the payload, so framing is lost after the error reply.
        this.replies.error(h, NBD_ERR.EINVAL, `write of ${h.length} bytes exceeds ${exp.maxPayload}`);
        return this.beginDraining();
      }
      if (!error && this.options.splicePayloads && h.length > this.reader.length && this.splicePayload(h)) return;
      const buf = !error && h.length >= OWN_PAYLOAD_MIN ? requestBuffers.take(h.length) : null;
      this.wait = { kind: 'payload', header: h, error, buf, filled: 0 };
      return;
    }
    if (error) return this.replies.error(h, error, `${nameOfNbdCmd(h.type)} refused`);
    const q = exp.queue;
    if (h.type !== NBD_CMD.READ) return this.track(h, this.replies.command(h, q, this.contexts));
    const budget = this.options.replyBudget;
    const counted = budget !== undefined && h.length > SMALL_READ;
    if (counted && !budget.tryTake(h.length)) return this.awaitBudget(h);
    const release = counted ? this.share!.hold(h.length) : undefined;
    if (!this.replies.needsReadPlan(h, q)) {
      // The common read: one queue read, one reply (no async frame on this per-request path).
      return this.track(h, q.read(h.offset, h.length).then((data) => this.replies.readReply(h, data, release)), release);
    }
    this.track(h, this.replies.read(h, q, release), release);
  }

  private handleWrite(h: RequestHeader, data: Buffer | Pipe): void {
    const fua = (h.flags & NBD_CMD_FLAG.FUA) !== 0;
    if (h.length === 0) return this.replies.ok(h);
    const q = this.export!.queue;
    // A pipe is empty once written, its content unknown if the write failed.
    if (!Buffer.isBuffer(data)) return this.track(h, q.spliceWrite(h.offset, h.length, data, { fua }).then(() => (pipes.give(data), this.replies.ok(h))), () => pipes.discard(data));
    // Once written, the payload's buffer may carry the next large WRITE (or READ).
    this.track(h, q.write(h.offset, data, { fua }).then(() => (requestBuffers.give(data), this.replies.ok(h))));
  }

  /**
   * Receives the payload of the WRITE `h` by splicing it into a pipe, with reading paused, where it
   * can (spliced-payload.ts); false: it is read the usual way.
   */
  private splicePayload(h: RequestHeader): boolean {
    const live = (): boolean => this.phase === 'transmission' && !this.socket.destroyed;
    const head = (into: (bytes: Buffer) => void): void => void this.reader.decode(this.reader.length, into); // copied: not lent
    const splice = PayloadSplice.start(this.out.plainFd, h.length, this.export!.queue, head, live);
    if (!splice) return false;
    this.wait = { kind: 'spliced', splice };
    this.socket.pause();
    void splice.outcome.then((end) => {
      if (end.kind === 'gone' || !live()) {
        dropPayload(end); // cut short: dropped, as when a session drains or closes while reading one
        if (end.kind !== 'gone' || this.phase !== 'transmission') return;
        log.warn(`${this.description}: ${end.reason}; closing`);
        return this.terminate();
      }
      this.wait = end.kind === 'buffered' ? { kind: 'payload', header: h, error: 0, buf: end.buf, filled: end.filled } : { kind: 'request' };
      if (end.kind === 'spliced') this.handleWrite(h, end.pipe);
      this.socket.resume();
      this.pump();
    });
    return true;
  }

  /** Counts a request in flight; its failure becomes an error reply for `h` (and `onFail` runs). */
  private track(h: RequestHeader, p: Promise<void>, onFail?: () => void): void {
    this.inFlight++;
    p.then(this.untrack, (err: unknown) => {
      try {
        onFail?.();
        this.replies.backendError(h, err);
      } finally {
        this.untrack();
      }
    });
  }

  /**
   * The READ `h` waits, with reading paused, until the budget has room: retried when a READ gives
   * bytes back, and every 50 ms (other clients' sockets draining frees room too).
   */
  private awaitBudget(h: RequestHeader): void {
    this.wait = { kind: 'admission', header: h };
    this.blocked = true;
    this.socket.pause();
    this.share!.whenRoom(this.onBudgetFreed);
  }

  private readonly onBudgetFreed = (): void => {
    if (!this.blocked || this.phase !== 'transmission' || this.wait.kind !== 'admission') return;
    this.blocked = false;
    this.pump();
    if (!this.blocked) this.socket.resume();
  };

  private readonly untrack = (): void => {
    this.activity++;
    this.inFlight--;
    if (this.inFlight > 0) return;
    if (this.phase === 'draining') this.close();
    if (this.phase === 'closed') this.closedResolve();
  };

  /* ------------------------------------------------------------ output and flow control */

  /** True when we must stop reading requests: the queue or our reply backlog is full. */
  private mustWait(): boolean {
    const q = this.export!.queue;
    const backlog = Math.max(this.share?.held ?? 0, this.out.pendingBytes) > (this.options.maxPendingReplyBytes ?? DEFAULT_MAX_PENDING_REPLY_BYTES);
    if (!q.saturated && !backlog) return false;
    this.blocked = true;
    this.socket.pause();
    return true;
  }

  private readonly onQueueDrain = (): void => this.unblock();
  private readonly onSocketDrain = (): void => this.unblock();

  private unblock(): void {
    if (!this.blocked || this.phase !== 'transmission' || this.wait.kind === 'admission' || this.wait.kind === 'spliced') return;
    if (this.export!.queue.saturated) return;
    this.blocked = false;
    this.socket.resume();
    this.pump();
  }

  /* ------------------------------------------------------------ shutdown */

  /** Reply bytes queued (on the socket or waiting in TurnWriter) and not yet taken by the kernel. */
  get unsentBytes(): number {
    return this.out.pendingBytes;
  }

  /** Idle: in transmission with nothing in flight (whatever `activity` says about the past). */
  get idle(): boolean {
    return this.phase === 'transmission' && this.inFlight === 0;
  }

  /** Closes an idle connection the way NBD_CMD_DISC would. */
  closeIdle(): void {
    log.info(`${this.description}: idle past --idle-timeout; closing`);
    this.beginDraining();
  }

  private beginDraining(): void {
    if (this.phase !== 'transmission') return;
    this.phase = 'draining';
    this.socket.pause();
    if (this.inFlight === 0) this.close();
  }

  /** Graceful close: what we queued is sent, then the stream ends. */
  private close(): void {
    if (this.phase === 'closed') return;
    this.out.flushNow();
    this.socket.end();
    // A peer that never reads its replies must not keep the socket forever.
    setTimeout(() => this.socket.destroy(), 5000).unref();
    this.finish();
  }

  /** Immediate close: no more replies; the socket is released. */
  private terminate(): void {
    if (this.phase === 'closed') return;
    this.socket.destroy();
    this.finish();
  }

  private finish(): void {
    this.phase = 'closed';
    if (this.wait.kind === 'spliced') this.wait.splice.cancel();
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    // What this session held goes back now; its replies will never be read.
    this.share?.drop();
    this.unsubscribeDrain?.();
    this.host.sessionClosed(this);
    if (this.inFlight === 0) this.closedResolve();
  }
}

