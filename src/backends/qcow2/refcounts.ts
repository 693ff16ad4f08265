/**
 * In-memory refcounts and the cluster allocator of a writable qcow2 image.
 *
 * The whole refcount table and every refcount block are loaded at open (for a 1 TiB file with
 * 64 KiB clusters and 16-bit refcounts that is 32 MiB), so allocation is synchronous: two
 * requests in the same event-loop turn can never pick the same cluster. Nothing here does I/O;
 * the image's commit writes what `takeDirty()` hands out, in the order docs/qcow2.md gives.
 *
 * Growth: a missing refcount block for table index t is placed at the first cluster it covers
 * (t * refcountsPerBlock, free by definition) and counts itself; a full table is copied to a
 * larger one at the end of the file, and the old one is freed after the header points at the new.
 */
import { Errno, NbddError } from '../../core/errors.js';
import { MAX_REFCOUNT_TABLE_BYTES, getRefcount, maxRefcount, setRefcount, writeU64, type Geometry } from './format/index.js';

export interface RefcountSnapshot {
  /** Refcount blocks to write (copies), each at its own offset. */
  blocks: { offset: number; data: Buffer }[];
  /** Changed refcount table entries (ignored when `table` is set). */
  tableEntries: { index: number; offset: number }[];
  /** The whole table to write at a new place, after which the header must point at it. */
  table?: { offset: number; clusters: number; data: Buffer };
  /** Clusters of superseded tables, to free once the header update is durable. */
  oldTables: { offset: number; clusters: number }[];
}

export class Refcounts {
  /** Host offset of each refcount block by table index (0: none, all counts zero). */
  private table: number[];
  private readonly blocks = new Map<number, Buffer>();
  private readonly dirtyBlocks = new Set<number>();
  private readonly dirtyEntries = new Set<number>();
  private tableOffset: number;
  private tableClusters: number;
  /** Set when the table moved and the header still names the old one. */
  private relocated = false;
  private oldTables: { offset: number; clusters: number }[] = [];
  /** Lowest cluster index that may be free. */
  private cursor = 0;
  /** First cluster index past every cluster that is in use or was ever allocated. */
  private end: number;
  /** The largest count the entry width holds. */
  readonly max: number;
  /** Clusters holding refcount blocks. */
  private readonly blockClusters = new Set<number>();

  constructor(
    private readonly g: Geometry,
    tableOffset: number,
    tableClusters: number,
    table: number[],
    blocks: Map<number, Buffer>,
    fileLength: number,
  ) {
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = table;
    for (const [i, b] of blocks) this.blocks.set(i, b);
    for (const off of table) if (off !== 0) this.blockClusters.add(off / g.clusterSize);
    this.end = Math.ceil(fileLength / g.clusterSize);
    this.max = maxRefcount(g.refcountOrder);
  }

  /** Whether `cluster` holds the refcount table or a refcount block (the overlap check asks). */
  isStructure(cluster: number): boolean {
    const off = cluster * this.g.clusterSize;
    if (off >= this.tableOffset && off < this.tableOffset + this.tableClusters * this.g.clusterSize) return true;
    return this.blockClusters.has(cluster);
  }

  get(cluster: number): number {
    const block = this.blocks.get(Math.floor(cluster / this.g.refcountsPerBlock));
    return block ? getRefcount(block, cluster % this.g.refcountsPerBlock, this.g.refcountOrder) : 0;
  }

  /** Host bytes past the last cluster in use: where the file ends once metadata is written. */
  get hostEnd(): number {
    return this.end * this.g.clusterSize;
  }

  /** Bytes up to the end of the last cluster with a nonzero count. */
  get usedEnd(): number {
    let c = this.end - 1;
    while (c >= 0 && this.get(c) === 0) c--;
    return (c + 1) * this.g.clusterSize;
  }

  /**
   * Allocates up to `max` contiguous clusters with refcount 1, starting at the lowest free cluster,
   * and returns the host offset of the first and how many were taken (at least 1). Runs stop
   * where a refcount block is missing, so a new block can take the first cluster it covers.
   */
  allocateRun(max: number): { offset: number; count: number } {
    const E = this.g.refcountsPerBlock;
    for (;;) {
      let start = this.cursor;
      while (start < this.end && this.get(start) !== 0) start++;
      this.cursor = start;
      if (!this.blocks.has(Math.floor(start / E))) {
        this.createBlock(Math.floor(start / E)); // may take `start` itself: look again
        continue;
      }
      let count = 1;
      while (count < max && (start + count >= this.end || this.get(start + count) === 0) && this.blocks.has(Math.floor((start + count) / E))) count++;
      for (let c = start; c < start + count; c++) this.set(c, 1);
      this.cursor = start + count;
      this.end = Math.max(this.end, start + count);
      return { offset: start * this.g.clusterSize, count };
    }
  }

  /** Allocates one cluster with refcount 1 and returns its host offset. */
  allocate(): number {
    return this.allocateRun(1).offset;
  }

  /** Adds one reference to an allocated cluster. */
  increment(cluster: number): void {
    const v = this.get(cluster);
    if (v >= this.max) throw new NbddError(Errno.ENOSPC, `refcount of cluster ${cluster} would overflow ${this.g.refcountOrder} bits`);
    if (!this.blocks.has(Math.floor(cluster / this.g.refcountsPerBlock))) this.createBlock(Math.floor(cluster / this.g.refcountsPerBlock));
    this.set(cluster, v + 1);
  }

  /** Drops one reference; returns the new count. Asserts the count was positive. */
  decrement(cluster: number): number {
    const v = this.get(cluster);
    if (v === 0) throw new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: freeing cluster 0x${(cluster * this.g.clusterSize).toString(16)} whose refcount is already 0`);
    this.set(cluster, v - 1);
    if (v === 1 && cluster < this.cursor) this.cursor = cluster;
    return v - 1;
  }

  get dirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.dirtyEntries.size > 0 || this.relocated;
  }

  /** Copies and clears everything dirty, for one commit. */
  takeDirty(): RefcountSnapshot {
    const snap: RefcountSnapshot = { blocks: [], tableEntries: [], oldTables: this.oldTables };
    for (const t of this.dirtyBlocks) snap.blocks.push({ offset: this.table[t]!, data: Buffer.from(this.blocks.get(t)!) });
    if (this.relocated) {
      const data = Buffer.alloc(this.tableClusters * this.g.clusterSize);
      this.table.forEach((off, i) => writeU64(data, i * 8, off));
      snap.table = { offset: this.tableOffset, clusters: this.tableClusters, data };
    } else {
      for (const i of this.dirtyEntries) snap.tableEntries.push({ index: i, offset: this.table[i]! });
    }
    this.dirtyBlocks.clear();
    this.dirtyEntries.clear();
    this.relocated = false;
    this.oldTables = [];
    return snap;
  }

  get currentTable(): { offset: number; clusters: number } {
    return { offset: this.tableOffset, clusters: this.tableClusters };
  }

  private set(cluster: number, value: number): void {
    const t = Math.floor(cluster / this.g.refcountsPerBlock);
    setRefcount(this.blocks.get(t)!, cluster % this.g.refcountsPerBlock, this.g.refcountOrder, value);
    this.dirtyBlocks.add(t);
  }

  /** Creates the missing refcount block `t` in the first cluster it covers, counting itself. */
  private createBlock(t: number): void {
    if (t >= this.table.length) {
      this.grow(t + 1);
      if (this.blocks.has(t)) return; // the new table's own blocks may include it
    }
    const first = t * this.g.refcountsPerBlock;
    const block = Buffer.alloc(this.g.clusterSize);
    this.blocks.set(t, block);
    this.table[t] = first * this.g.clusterSize;
    this.blockClusters.add(first);
    this.dirtyEntries.add(t);
    this.set(first, 1); // the block counts itself
    this.end = Math.max(this.end, first + 1);
  }

  /**
   * Moves the refcount table to a larger one at the end of the file: the table at clusters
   * [end, end + n), followed by the refcount blocks that region needs and lacks, all counted.
   */
  private grow(minEntries: number): void {
    const E = this.g.refcountsPerBlock;
    const perCluster = this.g.clusterSize / 8;
    const start = this.end;
    let clusters = Math.max(this.tableClusters * 2, Math.ceil(minEntries / perCluster) + 1);
    let missing: number[] = [];
    for (;;) {
      // The blocks covering [start, start + clusters + missing.length) that do not exist yet.
      const needed: number[] = [];
      for (let t = Math.floor(start / E); t <= Math.floor((start + clusters + missing.length - 1) / E); t++) if (!this.blocks.has(t)) needed.push(t);
      const lastIndex = Math.floor((start + clusters + needed.length - 1) / E);
      if (lastIndex >= clusters * perCluster) {
        clusters++;
        continue;
      }
      if (needed.length === missing.length) break;
      missing = needed;
    }
    if (clusters * this.g.clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
      throw new NbddError(Errno.ENOSPC, `qcow2 refcount table would exceed ${MAX_REFCOUNT_TABLE_BYTES} bytes`);
    }
    const old = { offset: this.tableOffset, clusters: this.tableClusters };
    const wasOnDisk = !this.relocated;
    while (this.table.length < clusters * perCluster) this.table.push(0);
    missing.forEach((t, i) => {
      this.blocks.set(t, Buffer.alloc(this.g.clusterSize));
      this.table[t] = (start + clusters + i) * this.g.clusterSize;
      this.blockClusters.add(start + clusters + i);
    });
    for (let c = start; c < start + clusters + missing.length; c++) this.set(c, 1);
    this.end = start + clusters + missing.length;
    this.tableOffset = start * this.g.clusterSize;
    this.tableClusters = clusters;
    this.relocated = true;
    if (wasOnDisk) {
      this.oldTables.push(old);
    } else {
      // The superseded table was never written: free it at once.
      for (let c = old.offset / this.g.clusterSize; c < old.offset / this.g.clusterSize + old.clusters; c++) this.decrement(c);
    }
  }
}
