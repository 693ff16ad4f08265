/**
 * L2 tables: a bounded least-recently-used cache of them, keyed by L1 index, and the one place
 * that loads a table, or creates and links a new one. Tables are kept as the raw big-endian
 * cluster (`data`), read with `readUInt32BE` on lookup, so the hot path builds no BigInt and
 * copies nothing. Changed entries are written by the request that changed them (entry-writes.ts).
 *
 * Every table handed out is pinned for its taker (`acquire`, `cachedForWrite`, `forWrite`), who
 * gives it back with `release`; entry writes in flight pin it too. A pinned table is never evicted,
 * so the cache may exceed its capacity until they finish. An evicted table's cluster buffer is
 * read into by the next load — that bounds the memory of a cache that misses often (a 1 TiB image
 * read at random) by its capacity instead of by the next full collection — which is safe only
 * because nobody holds a table unpinned: not across an await, and not between a load and the
 * continuation of the request that waited for it.
 */
import { Errno, NbddError } from '../../core/errors.js';
import type { Allocator } from './allocator.js';
import { ENTRY_COPIED_HI, hex, writeEntry } from './format/index.js';
import type { ImageState } from './state.js';

export interface L2Table {
  /** Host offset of the table. */
  readonly offset: number;
  /** The table's cluster; owned by the cache, changed in place by writers. */
  readonly data: Buffer;
  pins: number;
  /** Looked up since the cache's eviction last passed it (L2Cache). */
  used: boolean;
  /** Set while a new table is being written and linked into L1; entry writers wait for it. */
  ready?: Promise<void>;
}

/**
 * Least recently used, approximately (CLOCK, or second chance): a lookup only marks the table
 * (`used`), and eviction walks the tables in the order they entered, moving a marked one to the
 * back with its mark cleared and dropping the first unmarked, unpinned one. A lookup moved the
 * table to the back of the Map itself before (delete and set): on a cache of a few tables that
 * made V8 rebuild the Map's hash table every few lookups, in its old generation where a
 * long-lived Map's tables live — 120,000 dead tables (18 MB) between two full GCs in 4k
 * random reads of a 1 GiB image.
 */
export class L2Cache {
  private readonly tables = new Map<number, L2Table>();

  /** `evicted` is told of each table dropped (never a pinned one). */
  constructor(
    readonly capacity: number,
    private readonly evicted: (table: L2Table) => void = () => undefined,
  ) {}

  /** The table for `l1Index` if cached; marks it used. */
  get(l1Index: number): L2Table | undefined {
    const t = this.tables.get(l1Index);
    if (t) t.used = true;
    return t;
  }

  pinnedCount(): number {
    let n = 0;
    for (const t of this.tables.values()) if (t.pins !== 0) n++;
    return n;
  }

  insert(l1Index: number, table: L2Table): void {
    this.tables.set(l1Index, table);
    if (this.tables.size <= this.capacity) return;
    // A table re-added here is visited again later in the same walk, unmarked by then.
    for (const [key, t] of this.tables) {
      if (this.tables.size <= this.capacity) break;
      if (t.pins > 0) continue;
      this.tables.delete(key);
      if (t.used) {
        t.used = false;
        this.tables.set(key, t);
      } else {
        this.evicted(t);
      }
    }
  }
}

/**
 * Evicted tables' buffers kept for the next loads (at least 8; more are left to the collector).
 * Enough for a batch of misses: a batch of 16 requests starts 16 loads before the first one ends,
 * and with 8 spares each such batch read 8 tables into fresh buffers and dropped 8 evicted ones —
 * at QD16 on a 1 TiB image, 30 MiB more resident memory waiting for the collector.
 */
const SPARE_BYTES = 4 * 1024 * 1024;
const MIN_SPARE_BUFFERS = 8;

/** A load in progress and how many takers wait for it: the table enters the cache pinned for each. */
interface Loading {
  promise: Promise<L2Table>;
  takers: number;
}

export class L2Tables {
  private readonly cache: L2Cache;
  private readonly loading = new Map<number, Loading>();
  private readonly spare: Buffer[] = [];

  constructor(
    private readonly st: ImageState,
    private readonly alloc: Allocator,
    cacheBytes: number,
  ) {
    const spares = Math.max(MIN_SPARE_BUFFERS, Math.floor(SPARE_BYTES / st.cs));
    this.cache = new L2Cache(Math.max(4, Math.floor(cacheBytes / st.cs)), (t) => {
      if (this.spare.length < spares) this.spare.push(t.data);
    });
  }

  /**
   * The L2 table of `l1i` pinned for the caller, who must `release` it; null when the L1 entry
   * is empty. Loads share one read. A cached table comes back without a promise.
   */
  acquire(l1i: number): L2Table | null | Promise<L2Table> {
    const cached = this.cache.get(l1i);
    if (cached) {
      cached.pins++;
      return cached;
    }
    const offset = this.st.l1Offset(l1i);
    if (offset === 0) return null;
    let loading = this.loading.get(l1i);
    if (!loading) {
      loading = { promise: null!, takers: 0 };
      loading.promise = this.load(l1i, offset, loading);
      this.loading.set(l1i, loading);
    }
    loading.takers++;
    return loading.promise;
  }

  /** How many cached tables are pinned: none once every request has finished (tests check it). */
  pinnedCount(): number {
    return this.cache.pinnedCount();
  }

  /** Gives back a table `acquire`, `cachedForWrite` or `forWrite` handed out. */
  release(table: L2Table): void {
    if (--table.pins < 0) throw new Error(`L2 table at ${hex(table.offset)} released more often than taken`);
  }

  private async load(l1i: number, offset: number, loading: Loading): Promise<L2Table> {
    try {
      const data = await this.st.port.readAt(this.spare.pop() ?? Buffer.allocUnsafe(this.st.cs), offset);
      // Pinned for every taker before anything else runs: the waiters resume a microtask later,
      // and another load's eviction in between must not take this table or its buffer.
      const table: L2Table = { offset, data, pins: loading.takers, used: false };
      this.cache.insert(l1i, table);
      return table;
    } finally {
      this.loading.delete(l1i);
    }
  }

  /**
   * What `forWrite` would give without waiting for anything — the table is cached, linked and
   * ours alone (its L1 entry has the copied flag), pinned for the caller — or null when it must
   * be called.
   */
  cachedForWrite(l1i: number): L2Table | null {
    const t = this.cache.get(l1i);
    if (!t || t.ready || (this.st.l1.readUInt32BE(l1i * 8) & ENTRY_COPIED_HI) === 0) return null;
    t.pins++;
    return t;
  }

  /**
   * The L2 table of `l1i` pinned for the caller (who must `release` it), allocating an empty one
   * when the L1 entry is empty.
   */
  async forWrite(l1i: number): Promise<L2Table> {
    const st = this.st;
    for (;;) {
      const found = await this.acquire(l1i);
      if (found) {
        try {
          if (found.ready) await found.ready;
          const hi = st.l1.readUInt32BE(l1i * 8);
          if ((hi & ENTRY_COPIED_HI) === 0) {
            if (st.refs!.get(found.offset / st.cs) !== 1) throw new NbddError(Errno.EPERM, `${st.path}: L2 table at ${hex(found.offset)} is shared (snapshots); writing is not supported`);
            writeEntry(st.l1, l1i * 8, found.offset, true, false);
            await this.writeL1(l1i);
          }
        } catch (err) {
          this.release(found);
          throw err;
        }
        return found;
      }
      // Another request may have created the table while this one waited: look again.
      if (st.l1Offset(l1i) !== 0) continue;
      if (this.alloc.available === 0) {
        await this.alloc.reserve(1);
        continue;
      }
      return this.create(l1i); // synchronous up to its first await: no other request interleaves
    }
  }

  /**
   * Takes a cluster from the pool for a new, empty L2 table of `l1i` and links it: the table is
   * written and made durable before the L1 entry naming it is written, so the file never names a
   * table whose cluster still holds old bytes. Writers of the table wait for that (`ready`);
   * readers see the empty table in memory at once. The table comes back pinned for the caller.
   */
  private async create(l1i: number): Promise<L2Table> {
    const st = this.st;
    const { offset } = this.alloc.take(1);
    st.metadataClusters.add(offset / st.cs);
    this.alloc.unpunch(offset / st.cs);
    const data = this.spare.pop()?.fill(0) ?? Buffer.alloc(st.cs);
    const table: L2Table = { offset, data, pins: 1, used: false };
    this.cache.insert(l1i, table);
    writeEntry(st.l1, l1i * 8, offset, true, false);
    const link = async (): Promise<void> => {
      await st.port.writeAt(table.data, offset); // still empty: writers wait for `ready`
      await st.port.fsync();
      await this.writeL1(l1i);
    };
    table.ready = link();
    try {
      await table.ready;
    } catch (err) {
      this.release(table);
      throw st.failed('writing a new L2 table', err);
    } finally {
      table.ready = undefined;
    }
    return table;
  }

  private async writeL1(l1i: number): Promise<void> {
    const st = this.st;
    await st.port.writeAt(Buffer.from(st.l1.subarray(l1i * 8, l1i * 8 + 8)), st.header.l1TableOffset + l1i * 8);
    st.unsyncedData = true;
  }
}
