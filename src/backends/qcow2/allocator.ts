/**
 * Where new host clusters come from: a pool of clusters whose refcount of 1 is already durable
 * and that nothing references yet, kept in sorted contiguous runs. Every data cluster and L2
 * table is taken from it, so the file never references a cluster before its count is on disk.
 * A reservation (`reserve`) fills the pool: counts through a commit, the file extended over the
 * clusters, one fdatasync — and only then the clusters are handed out.
 *
 * It also knows which free clusters read as zeroes (past the file's end at open, or punched when
 * freed), which lets a fresh cluster skip copy-on-write of zeroes.
 */
import { logger } from '../../core/log.js';
import { messageOf } from '../../core/errors.js';
import type { ImageState } from './state.js';

const log = logger('qcow2');

/**
 * Reservations start at this many bytes and grow fourfold each time up to a quarter of the
 * virtual size, within [16 MiB, 256 MiB] and 65536 clusters: every reservation costs an
 * fdatasync, and what a killed daemon leaks with it is address space only (reserved clusters are
 * never written, so the file has holes there).
 */
const FIRST_RESERVE_BYTES = 4 * 1024 * 1024;
const MIN_MAX_RESERVE_BYTES = 16 * 1024 * 1024;
const MAX_RESERVE_BYTES = 256 * 1024 * 1024;
const MAX_RESERVE_CLUSTERS = 65536;
const MIN_RESERVE_CLUSTERS = 8;

export interface ClusterRun {
  offset: number;
  count: number;
}

export class Allocator {
  private readonly pool: ClusterRun[] = [];
  private poolCount = 0;
  private reserving: Promise<void> | null = null;
  private reserveChunk: number;
  private readonly maxReserve: number;
  /** First cluster past the file's end at open; free clusters from here on read as zeroes. */
  private readonly zeroFrom: number;
  /** Clusters punched after their last reference went (they read as zeroes until rewritten). */
  private readonly punched = new Set<number>();
  private punchWorks = true;

  constructor(
    private readonly st: ImageState,
    /** Writes the refcount changes durably (the commit, see commit.ts). */
    private readonly commit: () => Promise<void>,
  ) {
    const cs = st.cs;
    this.zeroFrom = Math.ceil(st.openLength / cs);
    const maxBytes = Math.min(MAX_RESERVE_BYTES, Math.max(MIN_MAX_RESERVE_BYTES, st.size / 4));
    this.maxReserve = Math.max(MIN_RESERVE_CLUSTERS, Math.min(MAX_RESERVE_CLUSTERS, Math.floor(maxBytes / cs)));
    this.reserveChunk = Math.max(MIN_RESERVE_CLUSTERS, Math.min(this.maxReserve, Math.floor(FIRST_RESERVE_BYTES / cs)));
  }

  /** Clusters in the pool. */
  get available(): number {
    return this.poolCount;
  }

  /** The pool holds as many as it keeps (freed clusters beyond this drop their count). */
  get full(): boolean {
    return this.poolCount >= this.maxReserve;
  }

  /**
   * Takes up to `max` contiguous clusters from the pool (lowest first); the caller checked it is
   * not empty, and calls `unpunch` for each once it has asked `readsAsZero`.
   */
  take(max: number): ClusterRun {
    const cs = this.st.cs;
    const run = this.pool[0]!;
    const count = Math.min(max, run.count);
    const offset = run.offset;
    run.offset += count * cs;
    run.count -= count;
    if (run.count === 0) this.pool.shift();
    this.poolCount -= count;
    for (let c = offset / cs; c < offset / cs + count; c++) if (this.st.isMetadata(c)) throw this.st.overlap(c, 'a cluster allocation');
    // Refill ahead, so allocating writes seldom wait for a reservation's fdatasync.
    if (!this.reserving && !this.st.closed && this.poolCount < this.reserveChunk / 2) {
      this.reserve(0).catch((err) => log.debug(`${this.st.path}: reserving clusters ahead failed: ${messageOf(err)}`));
    }
    return { offset, count };
  }

  /** Resolves once a reservation (started now, or the one running) has filled the pool. */
  reserve(need: number): Promise<void> {
    this.reserving ??= this.doReserve(need).finally(() => {
      this.reserving = null;
    });
    return this.reserving;
  }

  /** Waits for a reservation started ahead of need (close does, before returning the pool). */
  async settled(): Promise<void> {
    await this.reserving?.catch(() => undefined);
  }

  /**
   * Allocates at least `need` clusters (more each time, see FIRST_RESERVE_BYTES), writes their
   * counts through a commit, extends the file over them and fdatasyncs, and only then adds them
   * to the pool: an L2 entry written later can never reach the disk before the count of its
   * cluster. A daemon killed with a pool in hand leaks those clusters (`qemu-img check -r leaks`
   * reclaims them); close returns them.
   */
  private async doReserve(need: number): Promise<void> {
    const st = this.st;
    const want = Math.max(need, this.reserveChunk);
    this.reserveChunk = Math.min(this.maxReserve, this.reserveChunk * 4);
    const runs: ClusterRun[] = [];
    for (let got = 0; got < want; ) {
      const run = st.refs!.allocateRun(want - got);
      runs.push(run);
      got += run.count;
    }
    await this.commit();
    // The file reaches past every pool cluster before any is referenced: a reference past the end
    // of the file is an error to `qemu-img check`, even where the cluster would read as zeroes.
    const hostEnd = st.refs!.hostEnd;
    if (hostEnd > st.fileLength) {
      await st.port.truncate(hostEnd);
      st.fileLength = hostEnd;
    }
    await st.port.fsync();
    for (const run of runs) this.add(run.offset, run.count);
  }

  /** Adds clusters to the pool, keeping its runs sorted and merged. */
  add(offset: number, count: number): void {
    const cs = this.st.cs;
    const pool = this.pool;
    let i = pool.length;
    while (i > 0 && pool[i - 1]!.offset > offset) i--;
    const before = pool[i - 1];
    const after = pool[i];
    const end = offset + count * cs;
    if (before && before.offset + before.count * cs === offset) {
      before.count += count;
      if (after && after.offset === end) {
        before.count += after.count;
        pool.splice(i, 1);
      }
    } else if (after && after.offset === end) {
      after.offset = offset;
      after.count += count;
    } else {
      pool.splice(i, 0, { offset, count });
    }
    this.poolCount += count;
  }

  /**
   * `n` contiguous clusters with refcount 1, outside the pool (bitmap tables and directories
   * span clusters). Shorter runs found on the way are given back; past the end of the file a run
   * always fits. Their count reaches the disk with the next commit.
   */
  contiguous(n: number): number {
    const refs = this.st.refs!;
    const cs = this.st.cs;
    const partial: ClusterRun[] = [];
    for (;;) {
      const run = refs.allocateRun(n);
      if (run.count === n) {
        for (let c = run.offset / cs; c < run.offset / cs + n; c++) if (this.st.isMetadata(c)) throw this.st.overlap(c, 'a cluster allocation');
        for (const p of partial) for (let k = 0; k < p.count; k++) refs.decrement(p.offset / cs + k);
        for (let k = 0; k < n; k++) this.punched.delete(run.offset / cs + k);
        return run.offset;
      }
      partial.push(run);
    }
  }

  /** Drops the pool's counts in memory (close: the commit that follows writes them). */
  returnAll(): void {
    const cs = this.st.cs;
    for (const run of this.pool.splice(0)) for (let k = 0; k < run.count; k++) this.st.refs!.decrement(run.offset / cs + k);
    this.poolCount = 0;
  }

  /**
   * Whether a free host cluster is known to hold zeroes: past the file's end at open (never
   * written since, or punched when freed), or punched by this process. Once a punch fails, nothing
   * is assumed.
   */
  readsAsZero(cluster: number): boolean {
    return this.punchWorks && (cluster >= this.zeroFrom || this.punched.has(cluster));
  }

  /** Punches `count` clusters from `first` whose last reference went (a refused punch only costs space). */
  async punch(first: number, count: number): Promise<void> {
    const cs = this.st.cs;
    // Punching saves space and lets fresh clusters skip zero copy-on-write; freeing works without.
    const done = await this.st.port.punchHole(first * cs, count * cs).then(
      () => true,
      () => false,
    );
    if (!done) this.punchWorks = false;
    for (let c = first; c < first + count; c++) this.punched.add(c);
  }

  /** A cluster taken from the pool is about to be written: it no longer reads as zeroes. */
  unpunch(cluster: number): void {
    this.punched.delete(cluster);
  }
}
