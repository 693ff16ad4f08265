/**
 * The crash-safe order, in one place (docs/qcow2.md, "Crash-safe ordering"). A request's data and
 * its L2 entries are in the file before it completes (`writeEntries`), so a killed daemon loses no
 * acknowledged write. The clusters a request released are freed only by a commit, once the
 * entries that dropped them are durable:
 *
 *   refcount blocks (+ a moved refcount table) → refcount table entries or header →
 *   frees (punch, drop the counts in memory) → the dropped counts' blocks,
 *
 * with an fdatasync between two steps whenever the earlier one wrote something. A crash at any
 * point leaves at worst leaked clusters. Commits run one at a time, in a chain; they follow a
 * flush, a FUA request, close, a reservation, and (one turn later) any request that freed some.
 */
import type { WriteOptions } from '../../core/backend.js';
import { turnEnd } from '../../core/batch.js';
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import type { Allocator } from './allocator.js';
import type { EntryWrites } from './entry-writes.js';
import { HEADER, u32, u64 } from './format/index.js';
import type { ImageState } from './state.js';

const log = logger('qcow2');

export class Committer {
  private chain: Promise<void> = Promise.resolve();
  private scheduled = false;

  constructor(
    private readonly st: ImageState,
    private readonly alloc: () => Allocator,
  ) {}

  /**
   * Writes a request's changed entries; then the clusters it released may be freed by a commit.
   * A failed write leaves memory and file apart, so the image takes no more writes.
   */
  async writeEntries(w: EntryWrites): Promise<void> {
    if (w.empty) return;
    const frees = w.frees.splice(0);
    try {
      await w.write();
    } catch (err) {
      throw this.st.failed('writing L2 entries', err);
    }
    this.st.unsyncedData = true;
    for (const c of frees) this.st.pendingFrees.push(c);
  }

  /**
   * After a write-type request: FUA commits and syncs (the promise returned); released clusters
   * get a commit soon. Undefined when there is nothing to wait for.
   */
  afterUpdate(options?: WriteOptions): Promise<void> | undefined {
    if (options?.fua) return this.commitAndSync();
    if (this.st.pendingFrees.length > 0) this.schedule();
    return undefined;
  }

  /**
   * Commits, then fdatasyncs. Freeing clusters dirties refcount blocks after they were written,
   * so a second commit follows then; with no request running meanwhile (as at close) nothing
   * is dirty afterwards.
   */
  async commitAndSync(): Promise<void> {
    if (!this.st.refs) return;
    for (let round = 0; round < 2 && (round === 0 || this.hasDirtyMetadata()); round++) await this.commit();
    await this.st.port.fsync();
  }

  private hasDirtyMetadata(): boolean {
    return this.st.refs!.dirty || this.st.pendingFrees.length > 0;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    void turnEnd().then(() => {
      this.scheduled = false;
      if (this.st.closed) return; // close commits everything itself, before the file closes
      this.commit().catch((err) => log.error(`${this.st.path}: metadata commit failed: ${messageOf(err)}`));
    });
  }

  /** Runs one commit after any running one; rejects if it or an earlier one failed. */
  commit(): Promise<void> {
    return this.inChain(() => {
      if (this.st.commitError) throw new NbddError(Errno.EIO, `${this.st.path}: an earlier metadata commit failed: ${messageOf(this.st.commitError)}`);
      return this.commitOnce();
    });
  }

  /**
   * Runs `op` in the commit chain (header rewrites must not interleave with a commit's). A failed
   * commit stops writes (`commitError`); a failed header rewrite (`fatal` false) is its caller's.
   */
  inChain(op: () => Promise<void>, fatal = true): Promise<void> {
    const run = this.chain.then(op);
    this.chain = run.catch((err) => {
      if (fatal) this.st.commitError ??= err;
    });
    return run;
  }

  /** One commit: the refcount changes, then the frees (the order above). */
  private async commitOnce(): Promise<void> {
    const { st } = this;
    const refs = st.refs!;
    const frees = st.pendingFrees;
    st.pendingFrees = [];
    let wrote = st.unsyncedData;
    st.unsyncedData = false;
    const port = st.port;
    const barrier = async (): Promise<void> => {
      if (wrote) await port.fsync();
      wrote = false;
    };
    /** Writes the dirty refcount state in order; returns the clusters of superseded tables. */
    const writeRefcounts = async (): Promise<number[]> => {
      if (!refs.dirty) return [];
      const snap = refs.takeDirty();
      // Counts may become durable before whatever they count: no barrier first.
      const first = snap.blocks.map((b) => ({ at: b.offset, data: b.data }));
      if (snap.table) first.push({ at: snap.table.offset, data: snap.table.data });
      await Promise.all(first.map((w) => port.writeAt(w.data, w.at)));
      wrote ||= first.length > 0;
      // refcount_table_offset and refcount_table_clusters are adjacent header fields.
      const pointers = snap.table
        ? [{ at: HEADER.refcountTableOffset, data: Buffer.concat([u64(snap.table.offset), u32(snap.table.clusters)]) }]
        : snap.tableEntries.map((t) => ({ at: st.header.refcountTableOffset + t.index * 8, data: u64(t.offset) }));
      if (pointers.length > 0) {
        await barrier();
        await Promise.all(pointers.map((w) => port.writeAt(w.data, w.at)));
        wrote = true;
      }
      if (snap.table) {
        st.header.refcountTableOffset = snap.table.offset;
        st.header.refcountTableClusters = snap.table.clusters;
      }
      return snap.oldTables.flatMap((t) => Array.from({ length: t.clusters }, (_, k) => t.offset / st.cs + k));
    };
    const toFree = frees.concat(await writeRefcounts());
    if (toFree.length === 0) return;
    await barrier();
    await this.applyFrees(toFree);
    // The dropped counts go to the file now, so a killed daemon leaks nothing it had freed.
    for (const c of await writeRefcounts()) st.pendingFrees.push(c);
  }

  /**
   * Punches clusters whose last reference goes, then drops the counts. An emptied cluster keeps a
   * count of 1 and joins the allocation pool while the pool is below its cap: its count on disk is
   * still at least 1, so it can be referenced again without another refcount sync, and the pool
   * hands out low clusters first, so freed space is reused before the file grows.
   */
  private async applyFrees(clusters: number[]): Promise<void> {
    const { st } = this;
    const alloc = this.alloc();
    const drops = new Map<number, number>();
    for (const c of clusters) drops.set(c, (drops.get(c) ?? 0) + 1);
    const emptied = [...drops].filter(([c, n]) => st.refs!.get(c) === n).map(([c]) => c).sort((x, y) => x - y);
    for (let i = 0; i < emptied.length; ) {
      let j = i + 1;
      while (j < emptied.length && emptied[j] === emptied[j - 1]! + 1) j++;
      await alloc.punch(emptied[i]!, j - i);
      for (let c = emptied[i]!; c <= emptied[j - 1]!; c++) st.metadataClusters.delete(c); // an old refcount table's cluster may hold data next
      i = j;
    }
    const pooled = new Set<number>();
    for (const c of emptied) {
      if (st.closed || alloc.full) break; // close gives the pool back
      pooled.add(c);
      alloc.add(c * st.cs, 1);
    }
    for (const c of clusters) {
      if (pooled.has(c)) pooled.delete(c); // keeps the cluster's last reference, as the pool's
      else st.refs!.decrement(c);
    }
  }
}
