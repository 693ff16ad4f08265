/**
 * BlockQueue: the one path from every frontend to a backend stack (layers + backend).
 *
 * - Submissions are gathered and dispatched once per event-loop turn (`setImmediate`, i.e. after
 *   every socket read of the current poll phase) as one batch (`runBatch`, src/core/batch.ts), so
 *   a backend sees the whole batch issued at once and can do per-batch work once for it (see the
 *   contract in `backend.ts`).
 * - Adjacent reads of a batch (contiguous ranges, in arrival order) are coalesced into one backend
 *   read and answered with views of it, up to MERGED_READ_MAX bytes.
 * - FLUSH is exact: it starts only after every write-type request received before it has
 *   completed, and then flushes the backend; concurrent flushes share one backend flush when that
 *   is still correct. FUA on a backend without native FUA becomes write + flush.
 * - What the backend lacks is emulated here (write-zeroes as writes of zeroes, no-op trim and
 *   cache, "all allocated" block status).
 * - Backpressure: `saturated` turns true at `maxDepth` requests or `maxBytes` payload bytes queued
 *   or in flight; frontends stop reading from their peers then and resume on `onDrain`.
 *
 * The queue trusts its callers: ranges, flags and read-only were validated by the frontend.
 */
import { DEFAULT_MAX_TRANSFER, allData, type Backend, type BackendCaps, type Extent, type WriteOptions, type ZeroOptions } from './backend.js';
import { runBatch } from './batch.js';
import { Errno, NbddError, assert, errnoOf } from './errors.js';
import { tryCall } from './try-call.js';
import { readOut, type Pipe } from '../io/pipes.js';
import { requestBuffers } from './request-buffers.js';

/**
 * Longest coalesced read. Merging saves a backend call per read, which matters for small reads;
 * a merged buffer is answered as views, which the request-buffer pool cannot take back, so runs
 * stay short: larger reads each get a pooled buffer of their own (sequential 1 MiB reads merged
 * into fresh 2–8 MiB buffers cost V8 a mark-compact every few dozen ms).
 */
const MERGED_READ_MAX = 128 * 1024;

type Entry =
  | { op: 'read'; offset: number; length: number; resolve: (b: Buffer) => void; reject: (e: unknown) => void }
  | { op: 'spliceRead'; offset: number; length: number; into: Pipe; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'write'; offset: number; data: Buffer; flags: WriteOptions; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'spliceWrite'; offset: number; length: number; from: Pipe; flags: WriteOptions; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'trim'; offset: number; length: number; flags: WriteOptions; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'writeZeroes'; offset: number; length: number; flags: ZeroOptions; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'flush'; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'cache'; offset: number; length: number; resolve: () => void; reject: (e: unknown) => void }
  | { op: 'blockStatus'; offset: number; length: number; resolve: (x: Extent[]) => void; reject: (e: unknown) => void };

export interface QueueOptions {
  /** Requests queued or in flight before `saturated` (default 256). */
  maxDepth?: number;
  /** Payload bytes queued or in flight before `saturated` (default 256 MiB). */
  maxBytes?: number;
}

const ZEROES = Buffer.alloc(1024 * 1024);


export class BlockQueue {
  /** The top of the stack. Frontends never reach it: they use the queue's methods, `size`, `caps`. */
  private readonly backend: Backend;
  private readonly maxDepth: number;
  private readonly maxBytes: number;
  private readonly maxRead: number;

  private pending: Entry[] = [];
  private scheduled = false;
  private inFlight = 0;
  private bytes = 0;
  /** Writes (and trims, zero writes) started and not settled, and those since the last FLUSH. */
  private writesPending = 0;
  private writes = new WriteGeneration();
  /** Settles once every write started before the last FLUSH that had to wait has settled. */
  private earlierWrites: Promise<void> = Promise.resolve();
  private flushRunning: Promise<void> | null = null;
  private flushNext: Promise<void> | null = null;
  private readonly drainListeners = new Set<() => void>();
  private idleWaiters: (() => void)[] = [];
  private closed = false;

  constructor(backend: Backend, options: QueueOptions = {}) {
    this.backend = backend;
    this.maxDepth = options.maxDepth ?? 256;
    this.maxBytes = options.maxBytes ?? 256 * 1024 * 1024;
    this.maxRead = Math.min(backend.caps.maxTransfer, DEFAULT_MAX_TRANSFER, MERGED_READ_MAX);
  }

  /** The stack's virtual size in bytes. */
  get size(): number {
    return this.backend.size;
  }

  /** What the stack can do (frontends advertise from these; the queue emulates the rest). */
  get caps(): BackendCaps {
    return this.backend.caps;
  }

  /* ------------------------------------------------------------ submission */

  read(offset: number, length: number): Promise<Buffer> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'read', offset, length, resolve, reject }, length));
  }

  /** Whether the stack reads into pipes (`spliceRead`): every layer lets it through to a backend that can. */
  get splicesReads(): boolean {
    return this.backend.spliceRead !== undefined;
  }

  /**
   * A read into the pipe `into` by reference (see `Backend.spliceRead`); only where `splicesReads`.
   * Rejects when the backend could not put it all in; the caller then reads the usual way.
   */
  spliceRead(offset: number, length: number, into: Pipe): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'spliceRead', offset, length, into, resolve, reject }, length));
  }

  write(offset: number, data: Buffer, flags: WriteOptions = {}): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'write', offset, data, flags, resolve, reject }, data.length));
  }

  /** Whether the stack writes from pipes (`spliceWrite`): every layer lets it through to a backend that can. */
  get splicesWrites(): boolean {
    return this.backend.spliceWrite !== undefined;
  }

  /**
   * A write of the `length` bytes the pipe `from` holds (see `Backend.spliceWrite`); only where
   * `splicesWrites`. A range the stack refuses that way (ENOTSUP) is read out of the pipe and
   * written as usual. Resolves with the pipe empty; after a rejection its content is unknown.
   */
  spliceWrite(offset: number, length: number, from: Pipe, flags: WriteOptions = {}): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'spliceWrite', offset, length, from, flags, resolve, reject }, length));
  }

  trim(offset: number, length: number, flags: WriteOptions = {}): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'trim', offset, length, flags, resolve, reject }, 0));
  }

  writeZeroes(offset: number, length: number, flags: ZeroOptions = {}): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'writeZeroes', offset, length, flags, resolve, reject }, 0));
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'flush', resolve, reject }, 0));
  }

  cache(offset: number, length: number): Promise<void> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'cache', offset, length, resolve, reject }, 0));
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return new Promise((resolve, reject) => this.enqueue({ op: 'blockStatus', offset, length, resolve, reject }, 0));
  }

  /* ------------------------------------------------------------ backpressure */

  /**
   * Reads folded into the read before them (contiguous in one batch): the layers below counted
   * one request where the frontends sent several.
   */
  mergedReads = 0;

  /** Requests queued or in flight. */
  get depth(): number {
    return this.pending.length + this.inFlight;
  }

  get saturated(): boolean {
    return this.depth >= this.maxDepth || this.bytes >= this.maxBytes;
  }

  /** Calls `listener` whenever the queue falls back below its limits. Returns an unsubscribe. */
  onDrain(listener: () => void): () => void {
    this.drainListeners.add(listener);
    return () => this.drainListeners.delete(listener);
  }

  /** Resolves once nothing is queued or in flight. */
  idle(): Promise<void> {
    if (this.depth === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Waits for in-flight work, flushes a writable backend, closes it. Later submissions fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle();
    await this.backend.close();
  }

  /* ------------------------------------------------------------ dispatch */

  private enqueue(entry: Entry, bytes: number): void {
    if (this.closed) {
      entry.reject(new NbddError(Errno.ESHUTDOWN, 'the device is shutting down'));
      return;
    }
    this.pending.push(entry);
    this.bytes += bytes;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.dispatch);
    }
  }

  private readonly dispatch = (): void => {
    this.scheduled = false;
    const batch = this.pending;
    this.pending = [];
    this.inFlight += batch.length;
    runBatch(() => this.issue(batch));
  };

  /** Calls the backend for every entry of `batch`, in order (contiguous reads as one). */
  private issue(batch: Entry[]): void {
    for (let i = 0; i < batch.length; ) {
      const entry = batch[i]!;
      if (entry.op === 'read') {
        i = this.startReads(batch, i);
        continue;
      }
      this.start(entry);
      i++;
    }
  }

  /** Starts the run of contiguous reads beginning at `batch[i]` as one backend read. */
  private startReads(batch: Entry[], i: number): number {
    const first = batch[i] as Extract<Entry, { op: 'read' }>;
    let end = first.offset + first.length;
    let j = i + 1;
    for (; j < batch.length; j++) {
      const e = batch[j]!;
      if (e.op !== 'read' || e.offset !== end || end + e.length - first.offset > this.maxRead) break;
      end += e.length;
    }
    if (j === i + 1) {
      this.settle(tryCall(() => this.backend.read(first.offset, first.length)), first, first.length);
      return j;
    }
    const run = batch.slice(i, j) as Extract<Entry, { op: 'read' }>[];
    this.mergedReads += run.length - 1;
    tryCall(() => this.backend.read(first.offset, end - first.offset)).then(
      (buf) => {
        for (const e of run) {
          e.resolve(buf.subarray(e.offset - first.offset, e.offset - first.offset + e.length));
          this.complete(e.length);
        }
      },
      // One bad sector must not fail its neighbours: each read of the run is tried on its own.
      () => {
        for (const e of run) this.settle(tryCall(() => this.backend.read(e.offset, e.length)), e, e.length);
      },
    );
    return j;
  }

  private start(entry: Exclude<Entry, { op: 'read' }>): void {
    switch (entry.op) {
      case 'write':
        this.trackWrite(tryCall(() => this.doWrite(entry.offset, entry.data, entry.flags)), entry, entry.data.length);
        return;
      case 'spliceWrite':
        this.trackWrite(this.doSpliceWrite(entry.offset, entry.length, entry.from, entry.flags), entry, entry.length);
        return;
      case 'trim':
        this.trackWrite(this.doTrim(entry.offset, entry.length, entry.flags), entry, 0);
        return;
      case 'writeZeroes':
        this.trackWrite(this.doWriteZeroes(entry.offset, entry.length, entry.flags), entry, 0);
        return;
      case 'flush': {
        if (this.writesPending === 0) return this.settle(this.flushBackend(), entry, 0);
        // Every write started before this FLUSH settles first (failed ones too); later ones may
        // run alongside it.
        this.earlierWrites = this.writes.close(this.earlierWrites);
        this.writes = new WriteGeneration();
        this.settle(this.earlierWrites.then(() => this.flushBackend()), entry, 0);
        return;
      }
      case 'spliceRead':
        this.settle(tryCall(() => this.backend.spliceRead!(entry.offset, entry.length, entry.into)), entry, entry.length);
        return;
      case 'cache':
        this.settle(this.backend.cache ? tryCall(() => this.backend.cache!(entry.offset, entry.length)) : Promise.resolve(), entry, 0);
        return;
      case 'blockStatus':
        this.settle(this.doBlockStatus(entry.offset, entry.length), entry, 0);
        return;
    }
  }

  /** Like `settle`, and counts `p` among the writes a later FLUSH waits for until it settles. */
  private trackWrite(p: Promise<void>, entry: { resolve: () => void; reject: (e: unknown) => void }, bytes: number): void {
    const generation = this.writes;
    generation.pending++;
    this.writesPending++;
    p.then(
      () => {
        this.writesPending--;
        generation.settleOne();
        entry.resolve();
        this.complete(bytes);
      },
      (err) => {
        this.writesPending--;
        generation.settleOne();
        entry.reject(err);
        this.complete(bytes);
      },
    );
  }

  private settle<T>(p: Promise<T>, entry: { resolve: (v: T) => void; reject: (e: unknown) => void }, bytes: number): void {
    p.then(
      (v) => {
        entry.resolve(v);
        this.complete(bytes);
      },
      (err) => {
        entry.reject(err);
        this.complete(bytes);
      },
    );
  }

  /** Accounts for a settled entry (its promise already settled) and wakes drain and idle waiters. */
  private complete(bytes: number): void {
    const wasSaturated = this.saturated;
    this.inFlight--;
    this.bytes -= bytes;
    if (wasSaturated && !this.saturated) for (const l of this.drainListeners) l();
    if (this.depth === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /* ------------------------------------------------------------ emulation */

  private doWrite(offset: number, data: Buffer, flags: WriteOptions): Promise<void> {
    if (!flags.fua) return this.backend.write(offset, data);
    return this.withFua((options) => this.backend.write(offset, data, options));
  }

  private doSpliceWrite(offset: number, length: number, from: Pipe, flags: WriteOptions): Promise<void> {
    const write = (options?: WriteOptions): Promise<void> =>
      tryCall(() => this.backend.spliceWrite!(offset, length, from, options)).catch((err: unknown) => {
        if (errnoOf(err) !== Errno.ENOTSUP) throw err;
        const data = readOut(from, requestBuffers.take(length));
        return this.backend.write(offset, data, options).then(() => requestBuffers.give(data));
      });
    return flags.fua ? this.withFua(write) : write();
  }

  /** A FUA write: the backend's own FUA where it has one, else the write and then a flush. */
  private withFua(write: (options?: WriteOptions) => Promise<void>): Promise<void> {
    if (this.backend.caps.fua) return write({ fua: true });
    return write().then(() => this.flushBackend());
  }

  private async doTrim(offset: number, length: number, flags: WriteOptions): Promise<void> {
    if (!this.backend.trim || !this.backend.caps.trim) return; // advisory: dropping it is correct
    const native = !!flags.fua && this.backend.caps.fua;
    await this.backend.trim(offset, length, native ? { fua: true } : undefined);
    if (flags.fua && !native) await this.flushBackend();
  }

  private async doWriteZeroes(offset: number, length: number, flags: ZeroOptions): Promise<void> {
    const fuaNative = !!flags.fua && this.backend.caps.fua;
    if (this.backend.writeZeroes && this.backend.caps.writeZeroes) {
      await this.backend.writeZeroes(offset, length, { noHole: flags.noHole, fastZero: flags.fastZero, fua: fuaNative });
    } else {
      if (flags.fastZero) throw new NbddError(Errno.ENOTSUP, 'fast zeroing is not supported by this backend');
      for (let done = 0; done < length; ) {
        const n = Math.min(ZEROES.length, length - done);
        await this.backend.write(offset + done, ZEROES.subarray(0, n));
        done += n;
      }
    }
    if (flags.fua && !fuaNative) await this.flushBackend();
  }

  private async doBlockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.backend.blockStatus || !this.backend.caps.blockStatus) return allData(length);
    const extents = await this.backend.blockStatus(offset, length);
    assert(extents.length > 0 && extents.every((e) => e.length > 0), 'blockStatus returned an empty or zero-length extent');
    return extents;
  }

  /**
   * Flushes the backend. A flush asked for while none runs starts one; while one runs, the request
   * joins a single follow-up flush (the running one may have begun before the caller's writes
   * completed, so it cannot cover them).
   */
  private flushBackend(): Promise<void> {
    const backend = this.backend;
    if (!backend.flush || !backend.caps.flush) return Promise.resolve();
    if (!this.flushRunning) {
      this.flushRunning = backend.flush().finally(() => {
        this.flushRunning = null;
      });
      return this.flushRunning;
    }
    if (!this.flushNext) {
      this.flushNext = this.flushRunning
        .catch(() => undefined)
        .then(() => {
          this.flushNext = null;
          return this.flushBackend();
        });
    }
    return this.flushNext;
  }
}

/**
 * The writes started between two FLUSHes that had to wait, counted rather than kept in a Set: a
 * long-lived Set with an add and a delete per write made V8 rebuild its hash table every few
 * writes, in the old generation (thousands of dead tables between full GCs under 4k writes).
 */
class WriteGeneration {
  pending = 0;
  private wake: (() => void) | null = null;

  /** The FLUSH ending this generation: settles once its writes and `earlier` have settled. */
  close(earlier: Promise<void>): Promise<void> {
    if (this.pending === 0) return earlier;
    const own = new Promise<void>((resolve) => (this.wake = resolve));
    return Promise.all([earlier, own]).then(() => undefined);
  }

  settleOne(): void {
    if (--this.pending === 0 && this.wake) {
      this.wake();
      this.wake = null;
    }
  }
}
