/**
 * Statistics: per-operation counts, errors, bytes and a latency histogram, measured at the top
 * of the layer stack (what the frontends see, including bitmap persistence and copy-before-write).
 *
 * Latency buckets are powers of two in microseconds: bucket i counts requests that took
 * [2^(i-1), 2^i) µs (bucket 0: under 1 µs); the last bucket also takes everything slower.
 */
import type { Backend, Extent, WriteOptions, ZeroOptions } from '../core/backend.js';
import { PassThroughLayer } from '../core/layer.js';
import { tryCall } from '../core/try-call.js';
import { Errno, errnoOf } from '../core/errors.js';

export const STAT_OPS = ['read', 'write', 'trim', 'writeZeroes', 'flush', 'blockStatus', 'cache'] as const;
export type StatOp = (typeof STAT_OPS)[number];
/** Buckets up to 2^25 µs (~33 s). */
export const LATENCY_BUCKETS = 27;

export interface OpStats {
  count: number;
  errors: number;
  bytes: number;
  /** Sum of latencies, µs (mean = totalUs / count). */
  totalUs: number;
  maxUs: number;
  /** `LATENCY_BUCKETS` counts; bucket i = [2^(i-1), 2^i) µs. */
  latencyUs: number[];
}

export type StatsSnapshot = Record<StatOp, OpStats>;

function emptyOp(): OpStats {
  return { count: 0, errors: 0, bytes: 0, totalUs: 0, maxUs: 0, latencyUs: new Array(LATENCY_BUCKETS).fill(0) };
}

/** The bucket of a latency in µs. */
export function latencyBucket(us: number): number {
  if (us < 1) return 0;
  return Math.min(LATENCY_BUCKETS - 1, Math.floor(Math.log2(us)) + 1);
}

/** Per-operation counters since a moment. */
export interface StatsSource {
  readonly since: Date;
  snapshot(): StatsSnapshot;
}

export class StatsLayer extends PassThroughLayer implements StatsSource {
  override readonly kind = 'stats';
  private ops: StatsSnapshot = StatsLayer.empty();
  readonly since = new Date();

  constructor(next: Backend) {
    super(next);
    // Counted as reads and writes: to the stats a pipe is just where the bytes are. A range refused
    // with ENOTSUP is not counted: the queue reads or writes it again the usual way.
    if (next.spliceRead) this.spliceRead = (offset, length, into) => this.measure('read', length, () => next.spliceRead!(offset, length, into), true);
    if (next.spliceWrite) {
      this.spliceWrite = (offset, length, from, options) => this.measure('write', length, () => next.spliceWrite!(offset, length, from, options), true);
    }
  }

  private static empty(): StatsSnapshot {
    return Object.fromEntries(STAT_OPS.map((op) => [op, emptyOp()])) as StatsSnapshot;
  }

  /** A deep copy of the counters. */
  snapshot(): StatsSnapshot {
    return structuredClone(this.ops);
  }

  /**
   * Runs `run` and records it. Plain promise callbacks rather than an async function: this wraps
   * every request, and each async frame costs a promise and a microtask more.
   */
  private measure<T>(op: StatOp, bytes: number, run: () => Promise<T>, spliced = false): Promise<T> {
    const t0 = performance.now();
    return tryCall(run).then(
      (v) => {
        this.record(op, t0, bytes, false);
        return v;
      },
      (err: unknown) => {
        if (!spliced || errnoOf(err) !== Errno.ENOTSUP) this.record(op, t0, 0, true);
        throw err;
      },
    );
  }

  private record(op: StatOp, t0: number, bytes: number, failed: boolean): void {
    const us = (performance.now() - t0) * 1000;
    const s = this.ops[op];
    if (failed) s.errors++;
    else s.bytes += bytes;
    s.count++;
    s.totalUs += us;
    if (us > s.maxUs) s.maxUs = us;
    s.latencyUs[latencyBucket(us)]!++;
  }

  override read(offset: number, length: number): Promise<Buffer> {
    return this.measure('read', length, () => super.read(offset, length));
  }

  override write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.measure('write', data.length, () => super.write(offset, data, options));
  }

  override trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.measure('trim', length, () => super.trim(offset, length, options));
  }

  override writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.measure('writeZeroes', length, () => super.writeZeroes(offset, length, options));
  }

  override flush(): Promise<void> {
    return this.measure('flush', 0, () => super.flush());
  }

  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.measure('blockStatus', length, () => super.blockStatus(offset, length));
  }

  override cache(offset: number, length: number): Promise<void> {
    return this.measure('cache', length, () => super.cache(offset, length));
  }
}
