/**
 * The io_uring engine under UringFilePort (src/io/uring-port.ts) and the spliced replies and
 * payloads (src/nbd/turn-writer.ts, src/nbd/server/spliced-payload.ts), through the native addon
 * `native/uring.c` (see docs/io-engine.md).
 *
 * Every read, write, fsync and fallocate issued during one event-loop turn sits in the submission
 * queue until the addon's uv_prepare hook enters the kernel once for all of them; completions come
 * back in batches, one JavaScript call per drain. No libuv thread-pool hop, no futex per request.
 *
 * Ownership: a Buffer handed to the engine is pinned by the addon (a napi_ref) until its
 * completion arrives, so the kernel never touches freed memory even if the caller drops it; the
 * caller must still not modify a buffer being written, nor read one being read into, until the
 * promise settles.
 */
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';

/** Submission-queue entries; the completion queue (and the in-flight limit) is twice this. */
export const URING_SQ_ENTRIES = 256;
export const URING_CQ_ENTRIES = 512;

/** Path of the built addon, relative to this module (src/io or dist/io). */
const ADDON_PATH = '../../native/build/Release/nbdd_uring.node';

const EINTR = osConstants.errno.EINTR;
const ECANCELED = osConstants.errno.ECANCELED;

/** Opaque ring handle (an N-API external). */
type RingHandle = { readonly __ring: unique symbol };

/** The addon's functions. Queue calls return a slot number, or -1 when the ring is full. */
interface UringAddon {
  setup(sqEntries: number, cqEntries: number, onComplete: (pairs: Int32Array) => void): RingHandle;
  read(ring: RingHandle, fd: number, buf: Buffer, offset: number, how: number): number;
  write(ring: RingHandle, fd: number, buf: Buffer, offset: number, how: number): number;
  writev(ring: RingHandle, fd: number, bufs: Buffer[], offset: number, how: number): number;
  fsync(ring: RingHandle, fd: number, datasync: boolean): number;
  fallocate(ring: RingHandle, fd: number, mode: number, offset: number, length: number): number;
  submit(ring: RingHandle): number;
  close(ring: RingHandle): void;
  inFlight(ring: RingHandle): number;
  splice(ring: RingHandle, fdIn: number, offset: number, pipeFd: number, length: number): number;
  spliceOut(ring: RingHandle, fd: number, offset: number, pipeFd: number, length: number): number;
  poll(ring: RingHandle, fd: number, events: number): number;
  cancel(ring: RingHandle, slot: number): number;
  canSplice(ring: RingHandle): boolean;
}

/** `how` bits of read/write/writev (native/uring.c): IOSQE_ASYNC, RWF_DSYNC. */
export const HOW_OFFLOAD = 1;
export const HOW_DSYNC = 2;

const enum OpKind {
  Read,
  Write,
  Writev,
  Fsync,
  Fallocate,
  Splice,
  SpliceOut,
  Poll,
  Cancel,
}

/**
 * One operation from queueing to completion. `a`, `b`, `c`: offset, `how`, unused for
 * read/write/writev; mode, offset, length for fallocate; offset, pipe, length for splice and
 * spliceOut (`fd` the file); events for poll; the slot to cancel for cancel.
 */
class UringOp {
  resolve!: (res: number) => void;
  reject!: (err: NbddError) => void;
  /** Its addon slot while queued or in flight, else -1. */
  slot = -1;
  constructor(
    readonly kind: OpKind,
    readonly fd: number,
    readonly buf: Buffer | Buffer[] | null,
    readonly a: number,
    readonly b: number,
    readonly c: number,
  ) {}
}

const OP_NAMES = ['read', 'write', 'writev', 'fdatasync', 'fallocate', 'splice', 'splice', 'poll', 'cancel'] as const;

const POLLIN = 0x1;
const POLLOUT = 0x4;

/** A wait for a socket's room or bytes (`UringEngine.waitWritable`, `waitReadable`); `cancel` settles it at once. */
export interface SocketWait {
  /**
   * Resolves true when the socket is ready or has an error to report (the next call tells which),
   * or the wait was cancelled; false when the ring cannot wait (it was closed).
   */
  readonly ready: Promise<boolean>;
  cancel(): void;
}

/**
 * One io_uring shared by every UringFilePort of the process. Operations that find the ring full
 * (slots or SQ) wait in a FIFO backlog and are queued as completions free slots. Results of -EINTR
 * or -EAGAIN are queued again; other negative results reject with NbddError(errno).
 */
export class UringEngine {
  /** Operation per addon slot, while it is queued or in flight. */
  private readonly slots: (UringOp | undefined)[] = new Array(URING_CQ_ENTRIES);
  private backlog: UringOp[] = [];
  private batch: UringOp[] = [];
  private closed = false;

  private constructor(
    private readonly addon: UringAddon,
    private readonly ring: RingHandle,
  ) {}

  /** Loads the addon and sets up a ring. Throws (with the reason) where either is impossible. */
  static create(): UringEngine {
    const addon = createRequire(import.meta.url)(ADDON_PATH) as UringAddon;
    let engine: UringEngine | undefined;
    const ring = addon.setup(URING_SQ_ENTRIES, URING_CQ_ENTRIES, (pairs) => engine!.onComplete(pairs));
    engine = new UringEngine(addon, ring);
    return engine;
  }

  /**
   * Read and write transfer up to the buffer's length and resolve with the byte count (short at
   * end of file, or rarely otherwise). Reads are always tried inline (a buffered read miss then
   * waits on the page cache without a worker thread). `how`: HOW_OFFLOAD sends the request straight
   * to the kernel's worker threads (IOSQE_ASYNC) instead of trying it inline on this thread first
   * (right for buffered writes, which would otherwise do their page-cache work inside
   * io_uring_enter); HOW_DSYNC completes a write once its bytes are durable (RWF_DSYNC).
   */
  read(fd: number, buf: Buffer, offset: number): Promise<number> {
    return this.run(new UringOp(OpKind.Read, fd, buf, offset, 0, 0));
  }
  write(fd: number, buf: Buffer, offset: number, how = 0): Promise<number> {
    return this.run(new UringOp(OpKind.Write, fd, buf, offset, how, 0));
  }
  writev(fd: number, bufs: Buffer[], offset: number, how = 0): Promise<number> {
    return this.run(new UringOp(OpKind.Writev, fd, bufs, offset, how, 0));
  }
  fdatasync(fd: number): Promise<number> {
    return this.run(new UringOp(OpKind.Fsync, fd, null, 0, 0, 0));
  }
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number> {
    return this.run(new UringOp(OpKind.Fallocate, fd, null, mode, offset, length));
  }

  /** Whether `splice`, `spliceOut`, `waitWritable` and `waitReadable` work (kernel 5.7 and later). */
  get canSplice(): boolean {
    return !this.closed && this.addon.canSplice(this.ring);
  }

  /**
   * Moves up to `length` bytes of file `fdIn` at `offset` into the pipe `pipeFd` by reference to
   * the page cache (no copy), without waiting for room in the pipe: resolves with the bytes moved;
   * rejects with EAGAIN when the pipe is full (never retried here).
   */
  splice(fdIn: number, offset: number, pipeFd: number, length: number): Promise<number> {
    return this.run(new UringOp(OpKind.Splice, fdIn, null, offset, pipeFd, length));
  }

  /**
   * Moves up to `length` bytes from the pipe `pipeFd` into the file `fd` at `offset` (the kernel
   * copies them into the page cache), in a kernel worker: resolves with the bytes moved; rejects
   * with EAGAIN when the pipe is empty (never retried here).
   */
  spliceOut(pipeFd: number, fd: number, offset: number, length: number): Promise<number> {
    return this.run(new UringOp(OpKind.SpliceOut, fd, null, offset, pipeFd, length));
  }

  /**
   * Waits, without a thread, until the socket `fd` has room to write (or an error). Cancel it before
   * giving up the socket: a poll on a socket whose peer never reads would never end.
   */
  waitWritable(fd: number): SocketWait {
    return this.waitFor(fd, POLLOUT);
  }

  /**
   * Waits, without a thread, until the socket `fd` has bytes to read (or an error, or the peer's
   * end). Cancel it before giving up the socket: a peer may never send.
   */
  waitReadable(fd: number): SocketWait {
    return this.waitFor(fd, POLLIN);
  }

  private waitFor(fd: number, events: number): SocketWait {
    const op = new UringOp(OpKind.Poll, fd, null, events, 0, 0);
    const ready = this.run(op).then(
      () => true,
      (err: NbddError) => err.errno === ECANCELED,
    );
    return {
      ready,
      cancel: () => {
        const i = this.backlog.indexOf(op);
        if (i >= 0) {
          this.backlog.splice(i, 1);
          op.resolve(0);
        } else if (op.slot >= 0 && !this.closed) {
          // Its completion (-ECANCELED, or the revents if it won the race) settles `ready`.
          this.run(new UringOp(OpKind.Cancel, -1, null, op.slot, 0, 0)).catch(() => undefined);
        }
      },
    };
  }

  /** Operations queued or in flight in the kernel (not counting the backlog). */
  get inFlight(): number {
    return this.closed ? 0 : this.addon.inFlight(this.ring);
  }

  /**
   * Completes every operation already requested (blocking the thread meanwhile): the addon waits
   * for the ring and delivers completions, each delivery moves backlog into the ring. Then the ring
   * is released and later calls reject with EBADF.
   */
  close(): void {
    if (this.closed) return;
    this.addon.close(this.ring);
    this.closed = true;
  }

  private run(op: UringOp): Promise<number> {
    if (this.closed) return Promise.reject(new NbddError(Errno.EBADF, 'io_uring engine closed'));
    return new Promise<number>((resolve, reject) => {
      op.resolve = resolve;
      op.reject = reject;
      if (this.backlog.length > 0 || !this.issue(op)) this.backlog.push(op);
    });
  }

  /** Puts `op` in the submission queue; false when the ring is full. */
  private issue(op: UringOp): boolean {
    const { addon, ring } = this;
    let slot: number;
    switch (op.kind) {
      case OpKind.Read:
        slot = addon.read(ring, op.fd, op.buf as Buffer, op.a, op.b);
        break;
      case OpKind.Write:
        slot = addon.write(ring, op.fd, op.buf as Buffer, op.a, op.b);
        break;
      case OpKind.Writev:
        slot = addon.writev(ring, op.fd, op.buf as Buffer[], op.a, op.b);
        break;
      case OpKind.Fsync:
        slot = addon.fsync(ring, op.fd, true);
        break;
      case OpKind.Fallocate:
        slot = addon.fallocate(ring, op.fd, op.a, op.b, op.c);
        break;
      case OpKind.Splice:
        slot = addon.splice(ring, op.fd, op.a, op.b, op.c);
        break;
      case OpKind.SpliceOut:
        slot = addon.spliceOut(ring, op.fd, op.a, op.b, op.c);
        break;
      case OpKind.Poll:
        slot = addon.poll(ring, op.fd, op.a);
        break;
      case OpKind.Cancel:
        slot = addon.cancel(ring, op.a);
        break;
    }
    if (slot < 0) return false;
    op.slot = slot;
    this.slots[slot] = op;
    return true;
  }

  /**
   * The addon's one call per drain: `pairs` is [slot, result, slot, result, ...]. The slots are
   * already free, so every operation is taken out before any is settled or queued again.
   */
  private onComplete(pairs: Int32Array): void {
    const batch = this.batch;
    const n = pairs.length >> 1;
    for (let i = 0; i < n; i++) {
      const slot = pairs[2 * i]!;
      batch[i] = this.slots[slot]!;
      batch[i]!.slot = -1;
      this.slots[slot] = undefined;
    }
    for (let i = 0; i < n; i++) {
      const op = batch[i]!;
      const res = pairs[2 * i + 1]!;
      if (res >= 0) op.resolve(res);
      else if ((res === -EINTR || (res === -Errno.EAGAIN && op.kind !== OpKind.Splice && op.kind !== OpKind.SpliceOut)) && !this.closed) this.backlog.push(op);
      else op.reject(new NbddError(-res, `io_uring ${OP_NAMES[op.kind]} failed: ${nameOfErrno(-res)}`));
    }
    batch.length = 0;
    this.pump();
  }

  /** Queues waiting operations, in order, while the ring has room. */
  private pump(): void {
    if (this.backlog.length === 0 || this.closed) return;
    let i = 0;
    while (i < this.backlog.length && this.issue(this.backlog[i]!)) i++;
    this.backlog = i === this.backlog.length ? [] : this.backlog.slice(i);
  }
}
