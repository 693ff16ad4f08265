/**
 * FilePort on io_uring, through the native addon `native/uring.c` (see docs/io-engine.md).
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
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, spliceToPipe } from '../sys/libc.js';
import { NodeFilePort, RangeZeroer, readFully, type FilePiece, type FilePort, type InlineIo } from './file-port.js';
import { tryCall } from '../core/try-call.js';

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
  pollOut(ring: RingHandle, fd: number): number;
  cancel(ring: RingHandle, slot: number): number;
  canSplice(ring: RingHandle): boolean;
}

/** `how` bits of read/write/writev (native/uring.c): IOSQE_ASYNC, RWF_DSYNC. */
const HOW_OFFLOAD = 1;
const HOW_DSYNC = 2;

const enum OpKind {
  Read,
  Write,
  Writev,
  Fsync,
  Fallocate,
  Splice,
  PollOut,
  Cancel,
}

/**
 * One operation from queueing to completion. `a`, `b`, `c`: offset, `how`, unused for
 * read/write/writev; mode, offset, length for fallocate; offset, pipe, length for splice; the
 * slot to cancel for cancel.
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

const OP_NAMES = ['read', 'write', 'writev', 'fdatasync', 'fallocate', 'splice', 'poll', 'cancel'] as const;

/** A wait for a socket's room (`UringEngine.waitWritable`); `cancel` settles it at once. */
export interface WritableWait {
  /**
   * Resolves true when the socket has room or an error to report (the next write tells which), or
   * the wait was cancelled; false when the ring cannot wait (it was closed).
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

  /** Whether `splice` and `waitWritable` work (kernel 5.7 and later). */
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
   * Waits, without a thread, until the socket `fd` has room to write (or an error). Cancel it before
   * giving up the socket: a poll on a socket whose peer never reads would never end.
   */
  waitWritable(fd: number): WritableWait {
    const op = new UringOp(OpKind.PollOut, fd, null, 0, 0, 0);
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
      case OpKind.PollOut:
        slot = addon.pollOut(ring, op.fd);
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
      else if ((res === -EINTR || (res === -Errno.EAGAIN && op.kind !== OpKind.Splice)) && !this.closed) this.backlog.push(op);
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

/**
 * FilePort whose data path (read, write, writev, fdatasync, punch, zero) runs on a UringEngine.
 * Opening, length, truncate and close reuse NodeFilePort (slow path).
 *
 * Reads first try preadv2(RWF_NOWAIT) on the event-loop thread, as NodeFilePort does: a page-cache
 * hit then costs one system call and completes in the same turn (see docs/io-engine.md for the
 * measurement); a miss goes to the ring. On tmpfs, small reads are plain system calls on this
 * thread, and so are small buffered writes on local filesystems while they stay fast (see
 * InlineIo; the policy is the inner NodeFilePort's, decided once at open).
 */
export class UringFilePort implements FilePort {
  private pending = 0;
  private idle: (() => void) | null = null;
  private closing: Promise<void> | null = null;
  /** What runs on the event-loop thread (see InlineIo): the inner port's. */
  private readonly inline: InlineIo;
  /** `how` of writes: buffered ones go to the kernel's workers (IOSQE_ASYNC); O_DIRECT ones are issued inline. */
  private readonly writeHow: number;
  private readonly zeroer = new RangeZeroer(
    (offset, length) => this.trackMutation(this.engine.fallocate(this.fd, FALLOC_FL_ZERO_RANGE, offset, length), offset, length),
    (buf, offset) => this.writeAt(buf, offset),
  );

  /**
   * The file's length as this port's writes left it, and that length at the start of the last
   * fdatasync that returned (writeDurable's choice; a hint, not a guarantee of anything).
   */
  private end: number;
  private syncedEnd: number;

  private constructor(
    private readonly engine: UringEngine,
    private readonly inner: NodeFilePort,
    direct: boolean,
    length: number,
  ) {
    this.end = this.syncedEnd = length;
    this.inline = inner.inline;
    this.writeHow = direct ? 0 : HOW_OFFLOAD;
    if (!direct && engine.canSplice) this.spliceTo = this.splicePages;
  }

  readonly spliceTo?: (pipeFd: number, offset: number, length: number) => Promise<void>;

  /**
   * `spliceTo`: in memory filesystems a plain splice on this thread (as their reads are, see
   * InlineIo), elsewhere the ring's (a page-cache miss then waits in a kernel worker). Bytes past
   * the end of the file, or a pipe without room, reject: the caller reads the usual way instead.
   */
  private readonly splicePages = async (pipeFd: number, offset: number, length: number): Promise<void> => {
    let done = 0;
    while (done < length) {
      const n = this.inline.memory
        ? spliceToPipe(this.fd, offset + done, pipeFd, length - done)
        : await this.track(this.engine.splice(this.fd, offset + done, pipeFd, length - done));
      if (n <= 0) throw new NbddError(n < 0 ? -n : Errno.EIO, `splice at ${offset + done}: ${n < 0 ? nameOfErrno(-n) : 'end of file'}`);
      done += n;
    }
  };

  /** Opens like NodeFilePort.open (same options and errors), then routes I/O through `engine`. */
  static async open(
    engine: UringEngine,
    path: string,
    options: { readOnly: boolean; direct?: boolean; create?: boolean; exclusive?: boolean },
  ): Promise<UringFilePort> {
    const inner = await NodeFilePort.open(path, options);
    try {
      return new UringFilePort(engine, inner, !!options.direct, await inner.length());
    } catch (err) {
      await inner.close();
      throw err;
    }
  }

  get path(): string {
    return this.inner.path;
  }
  get fd(): number {
    return this.inner.fd;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  readAt(buf: Buffer, offset: number): Promise<Buffer> {
    return readFully(this.fd, buf, offset, this.inline, (done) =>
      this.track(this.engine.read(this.fd, done === 0 ? buf : buf.subarray(done), offset + done)),
    );
  }

  writeAt(buf: Buffer, offset: number): Promise<void> {
    return tryCall(() => {
      this.assertWritable();
      this.grow(offset + buf.length);
      return this.inline.writes?.tryWrite(this.fd, buf, offset) ? undefined : this.writeRing(buf, offset);
    });
  }

  private async writeRing(buf: Buffer, offset: number, how = this.writeHow): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      done += await this.trackMutation(this.engine.write(this.fd, done === 0 ? buf : buf.subarray(done), offset + done, how), offset + done, buf.length - done);
    }
  }

  /**
   * One piece, in a file that has not grown since its last fdatasync: one RWF_DSYNC write, which
   * the kernel syncs alone. Otherwise the writes and one fdatasync, which measured faster
   * (`bench/scale.mjs`, bitmaps series, docs/performance.md): each RWF_DSYNC write flushes the
   * device's cache on its own, and in a file whose size changed the filesystem commits its
   * journal for it as well, while one fdatasync does both once for all.
   */
  async writeDurable(pieces: readonly FilePiece[]): Promise<void> {
    this.assertWritable();
    const [one] = pieces;
    if (pieces.length === 1 && this.end <= this.syncedEnd) {
      this.grow(one!.offset + one!.buf.length); // RWF_DSYNC makes a new size durable too
      return this.writeRing(one!.buf, one!.offset, this.writeHow | HOW_DSYNC);
    }
    await Promise.all(pieces.map((p) => this.writeAt(p.buf, p.offset)));
    await this.fsync();
  }

  async writevAt(bufs: Buffer[], offset: number): Promise<void> {
    this.assertWritable();
    const total = bufs.reduce((n, b) => n + b.length, 0);
    this.grow(offset + total);
    const written = await this.trackMutation(this.engine.writev(this.fd, bufs, offset, this.writeHow), offset, total);
    // Rare short write: finish with one contiguous buffer.
    if (written < total) await this.writeAt(Buffer.concat(bufs).subarray(written), offset + written);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    this.assertWritable();
    await this.trackMutation(this.engine.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length), offset, length);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.grow(offset + length);
    await this.zeroer.zero(offset, length);
  }

  async fsync(): Promise<void> {
    const end = this.end;
    await this.track(this.engine.fdatasync(this.fd));
    this.syncedEnd = Math.max(this.syncedEnd, end);
  }

  length(): Promise<number> {
    return this.inner.length();
  }

  truncate(length: number): Promise<void> {
    this.end = length;
    return this.track(this.inner.truncate(length)); // the inner port records it for InlineWrites
  }

  /** Waits for this port's operations still in flight (the kernel may be using the fd), then closes. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.pending > 0) await new Promise<void>((resolve) => (this.idle = resolve));
      await this.inner.close();
    })();
    return this.closing;
  }

  /** Counts `p` as in flight on this port until it settles. */
  private track<T>(p: Promise<T>): Promise<T> {
    this.pending++;
    const settle = (): void => {
      if (--this.pending === 0 && this.idle) this.idle();
    };
    p.then(settle, settle);
    return p;
  }

  /**
   * As `track`, for an operation that changes `length` bytes at `offset` (Infinity: to the end
   * and beyond): no inline write to that range overtakes it (see InlineWrites).
   */
  private trackMutation<T>(p: Promise<T>, offset: number, length: number): Promise<T> {
    const writes = this.inline.writes;
    return this.track(writes ? writes.track(p, offset, length) : p);
  }

  private assertWritable(): void {
    if (this.readOnly) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
  }

  private grow(end: number): void {
    if (end > this.end) this.end = end;
  }
}
