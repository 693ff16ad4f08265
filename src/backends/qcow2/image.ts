/**
 * A qcow2 v2/v3 image as a `Backend` (and as an `ImageLayer` under another qcow2), on a FilePort.
 *
 * Concurrency: every request takes a range lock over the guest clusters it touches (shared for
 * reads and block status, exclusive for writes, zeroes and discards), granted in arrival order.
 * Shared metadata (L1, cached L2 tables, refcounts) changes only in synchronous code, so two
 * requests of one turn never allocate the same cluster or table.
 *
 * Durability (docs/qcow2.md, "Crash-safe ordering"): a request's data and its L2 entries are in
 * the file before it completes, so a killed daemon loses no acknowledged write. Clusters are handed
 * out from a pool whose refcounts were made durable beforehand, and a new L2 table is durable
 * before L1 names it, so the file never references an uncounted cluster or an unwritten table.
 * Freed clusters are released by a commit (on flush, FUA, close, or after a request that freed
 * some), once the entries that dropped them are durable. FLUSH adds the fdatasync.
 */
import type { Backend, BackendCaps, Extent, WriteOptions, ZeroOptions } from '../../core/backend.js';
import { defaultCaps } from '../../core/backend.js';
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import type { FilePort } from '../../io/file-port.js';
import { decompressCluster } from './compress.js';
import { EntryWrites, TableWriter } from './entry-writes.js';
import { L2Cache, type L2Table } from './l2-cache.js';
import type { ImageLayer } from './layer.js';
import {
  AUTOCLEAR_BITMAPS,
  ENTRY_COMPRESSED_HI,
  ENTRY_COPIED_HI,
  ENTRY_ZERO_LO,
  MAX_BITMAP_DIRECTORY_BYTES,
  SUPPORTED_AUTOCLEAR,
  decodeBitmapDirectory,
  decodeCompressed,
  entryOffset,
  readU64,
  writeEntry,
  writeU64,
  type BitmapDirectoryEntry,
  type BitmapsExtension,
  EXT_BITMAPS,
  EXT_END,
  encodeExtension,
  type Geometry,
  type HeaderExtensions,
  type Qcow2Header,
} from './layout.js';
import { RangeLock } from './range-lock.js';
import { encodeBitmapsExtension as encodeBitmapsExtensionData } from '../../bitmaps/qcow2-bitmaps-codec.js';
import type { Qcow2BitmapHost } from '../../bitmaps/store-qcow2.js';
import { Refcounts } from './refcounts.js';

const log = logger('qcow2');

export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
/** Largest extent walk per blockStatus call, in allocation units. */
const MAX_STATUS_UNITS = 65536;
const L1_RESERVED_HI = 0x7f000000;
const L1_RESERVED_LO = 0x1ff;
const ALL_UNITS = 0xffffffff;
/**
 * Allocation pool reservations (see `reserve`) start at this many bytes and grow fourfold each
 * time up to a quarter of the virtual size, within [16 MiB, 256 MiB] and 65536 clusters: every
 * reservation costs an fdatasync, and what a killed daemon leaks with it is address space only
 * (reserved clusters are never written, so the file has holes there).
 */
const FIRST_RESERVE_BYTES = 4 * 1024 * 1024;
const MIN_MAX_RESERVE_BYTES = 16 * 1024 * 1024;
const MAX_RESERVE_BYTES = 256 * 1024 * 1024;
const MAX_RESERVE_CLUSTERS = 65536;
const MIN_RESERVE_CLUSTERS = 8;

// Kinds of guest ranges found by a mapping walk.
const RUN_NONE = 0;
const RUN_DATA = 1;
const RUN_ZERO = 2;
const RUN_BACKING = 3;

export interface Qcow2Parts {
  path: string;
  port: FilePort;
  header: Qcow2Header;
  extensions: HeaderExtensions;
  geometry: Geometry;
  l1: Buffer;
  /** Loaded for writable images only. */
  refcounts: Refcounts | null;
  /** Cluster indices holding fixed metadata (header, L1, refcount table and blocks, L2 tables). */
  metadataClusters: Set<number>;
  fileLength: number;
  backing: ImageLayer | null;
  backingName: string | null;
  l2CacheBytes: number;
}

/** Per-cluster plan of an allocating or in-place write (see `planWrite`). */
interface WritePlan {
  table: L2Table;
  entry: number; // byte index of the L2 entry in table.data
  ci: number; // guest cluster index
  a: number; // new data [a, b) within the cluster
  b: number;
  spanStart: number; // bytes of the host cluster to write, including copy-on-write head/tail
  spanEnd: number;
  host: number; // target host cluster offset (set by allocation when `fresh`)
  fresh: boolean;
  zeroHost: boolean; // a fresh host cluster known to read as zeroes
  zeroSource: boolean; // the old mapping reads as zeroes without I/O (zero flag, or no backing data)
  changed: boolean; // the L2 entry must be rewritten (false for plain in-place overwrites)
  freeOld: number[]; // host cluster indices to release once the new entry is durable
  alloc: number; // extended L2: new allocation / zero bitmaps
  zero: number;
  dataOffset: number; // where [a, b) starts in the caller's buffer
  head?: Buffer;
  tail?: Buffer;
}

function corrupt(message: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: ${message}`);
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

const ZEROES = Buffer.alloc(2 ** 21); // one cluster of the largest size

function isZero(buf: Buffer | undefined): boolean {
  return !buf || buf.equals(ZEROES.subarray(0, buf.length));
}

/** Bits su..eu-1 of a 32-bit subcluster bitmap. */
function unitMask(su: number, eu: number): number {
  return eu - su >= 32 ? ALL_UNITS : ((((1 << (eu - su)) - 1) << su) >>> 0);
}

export class Qcow2Image implements Backend, ImageLayer {
  readonly kind = 'qcow2';
  readonly format = 'qcow2' as const;
  readonly size: number;
  readonly caps: BackendCaps;
  readonly path: string;
  readonly header: Qcow2Header;
  readonly extensions: HeaderExtensions;
  readonly geometry: Geometry;
  readonly backing: ImageLayer | null;
  readonly backingName: string | null;

  private readonly port: FilePort;
  private readonly g: Geometry;
  private readonly cs: number;
  private readonly l1: Buffer;
  private readonly l2Cache: L2Cache;
  private readonly loading = new Map<number, Promise<L2Table>>();
  private readonly refs: Refcounts | null;
  private readonly metadataClusters: Set<number>;
  private readonly lock = new RangeLock();
  private readonly v3: boolean;
  private pendingFrees: number[] = [];
  /**
   * Host clusters whose refcount of 1 is already durable and that nothing references yet, in
   * contiguous runs: every data cluster and L2 table is taken from here (see `reserve`).
   */
  private readonly pool: { offset: number; count: number }[] = [];
  private poolCount = 0;
  private reserving: Promise<void> | null = null;
  private dataSync: Promise<void> | null = null;
  private reserveChunk: number;
  private readonly maxReserve: number;
  /** Autoclear bit 0 as found at open, before `prepareForWriting` cleared it. */
  private bitmapsConsistentAtOpen = false;
  /** First cluster past the file's end at open; free clusters from here on read as zeroes. */
  private readonly zeroFrom: number;
  /** Clusters punched after their last reference went (they read as zeroes until rewritten). */
  private readonly punched = new Set<number>();
  private punchWorks = true;
  private fileLength: number;
  private readonly openLength: number;
  private unsyncedData = false;
  private commitChain: Promise<void> = Promise.resolve();
  private commitScheduled = false;
  private commitError: unknown = null;
  /** Set when close begins: later requests are refused, scheduled commits left to close. */
  private closed = false;
  /** Requests (and flushes) in flight; close waits for them before its last commit. */
  private active = 0;
  private drained: (() => void) | null = null;

  constructor(parts: Qcow2Parts) {
    this.path = parts.path;
    this.port = parts.port;
    this.header = parts.header;
    this.extensions = parts.extensions;
    this.geometry = this.g = parts.geometry;
    this.cs = this.g.clusterSize;
    this.size = parts.header.size;
    this.l1 = parts.l1;
    this.refs = parts.refcounts;
    this.metadataClusters = parts.metadataClusters;
    this.fileLength = this.openLength = parts.fileLength;
    this.zeroFrom = Math.ceil(parts.fileLength / parts.geometry.clusterSize);
    this.backing = parts.backing;
    this.backingName = parts.backingName;
    this.v3 = parts.header.version === 3;
    this.l2Cache = new L2Cache(Math.max(4, Math.floor(parts.l2CacheBytes / this.cs)));
    const maxBytes = Math.min(MAX_RESERVE_BYTES, Math.max(MIN_MAX_RESERVE_BYTES, this.size / 4));
    this.maxReserve = Math.max(MIN_RESERVE_CLUSTERS, Math.min(MAX_RESERVE_CLUSTERS, Math.floor(maxBytes / this.cs)));
    this.reserveChunk = Math.max(MIN_RESERVE_CLUSTERS, Math.min(this.maxReserve, Math.floor(FIRST_RESERVE_BYTES / this.cs)));
    const readOnly = this.refs === null;
    this.caps = defaultCaps({
      readOnly,
      flush: !readOnly,
      fua: !readOnly,
      trim: !readOnly,
      writeZeroes: !readOnly,
      blockStatus: true,
      multiConn: true,
      preferredBlockSize: Math.min(this.cs, 64 * 1024),
    });
  }

  /**
   * Prepares a writable image for writing: clears the autoclear bits nbdd does not maintain (the
   * bitmaps bit included, as the spec requires of a program without bitmap support; the bitmaps
   * extension itself stays, readable through `extensions.bitmaps`) and makes that durable before
   * any other write. The open path has already refused dirty, corrupt and snapshot images.
   */
  async prepareForWriting(): Promise<void> {
    const h = this.header;
    this.bitmapsConsistentAtOpen = (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
    const clear = h.autoclearFeatures & ~SUPPORTED_AUTOCLEAR;
    if (clear !== 0n) {
      // The in-image bitmap store (src/bitmaps/store-qcow2.ts) sets it again once it has taken
      // the bitmaps over; without one they stay inconsistent, as the spec requires.
      if ((clear & AUTOCLEAR_BITMAPS) !== 0n) log.debug(`${this.path}: clearing the bitmaps autoclear bit until the bitmaps are taken over`);
      h.autoclearFeatures &= SUPPORTED_AUTOCLEAR;
      const field = Buffer.alloc(8);
      field.writeBigUInt64BE(h.autoclearFeatures);
      await this.port.writeAt(field, 88);
      await this.port.fsync();
    }
  }

  // ---------------------------------------------------------------- public Backend methods

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(buf, offset);
    return buf;
  }

  readInto(buf: Buffer, offset: number): Promise<void> {
    return this.track(async () => {
      const release = await this.lockRange(offset, buf.length, false);
      try {
        await this.readLocked(buf, offset);
      } finally {
        release();
      }
    });
  }

  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.update(offset, data.length, options, (w) => this.writeLocked(offset, data, w));
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    if (options?.fastZero) return Promise.reject(new NbddError(Errno.ENOTSUP, 'qcow2: fast zero is not offered'));
    return this.update(offset, length, options, (w) => this.zeroLocked(offset, length, options?.noHole === true, w));
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.update(offset, length, options, (w) => this.trimLocked(offset, length, w));
  }

  /** Commits all metadata changes and makes them and every completed write durable. */
  flush(): Promise<void> {
    return this.track(() => this.commitAndSync());
  }

  /**
   * Runs `fn` as a request in flight: refused with ESHUTDOWN once close has begun, and counted
   * until it settles, so close commits only after every accepted request changed its metadata.
   */
  private async track<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new NbddError(Errno.ESHUTDOWN, `${this.path} is closed`);
    this.active++;
    try {
      return await fn();
    } finally {
      if (--this.active === 0) this.drained?.();
    }
  }

  /**
   * A write, zero write or discard of guest [offset, offset + length), under an exclusive lock
   * held until the L2 entries it changed are in the file (even when it failed part way, since
   * memory already holds them).
   */
  private update(offset: number, length: number, options: WriteOptions | undefined, locked: (w: EntryWrites) => Promise<void>): Promise<void> {
    return this.track(async () => {
      this.assertWritable();
      const release = await this.lockRange(offset, length, true);
      const w = new EntryWrites(this.g.l2EntrySize, this.tableWriter);
      try {
        try {
          await locked(w);
        } finally {
          await this.writeEntries(w);
        }
      } finally {
        release();
      }
      await this.afterUpdate(options);
    });
  }

  private readonly tableWriter = (table: L2Table): TableWriter => (table.writer ??= new TableWriter(table, this.port));

  /**
   * Writes a request's changed entries; then the clusters it released may be freed by a commit.
   * A failed write leaves memory and file apart, so the image takes no more writes.
   */
  private async writeEntries(w: EntryWrites): Promise<void> {
    if (w.empty) return;
    const frees = w.frees.splice(0);
    try {
      await w.write();
    } catch (err) {
      this.commitError ??= err;
      throw new NbddError(Errno.EIO, `${this.path}: writing L2 entries failed: ${messageOf(err)}`);
    }
    this.unsyncedData = true;
    for (const c of frees) this.pendingFrees.push(c);
  }

  /**
   * Commits, then fdatasyncs. Freeing clusters dirties refcount blocks after they were written,
   * so a second commit follows then; with no request running meanwhile (as at close) nothing
   * is dirty afterwards.
   */
  private async commitAndSync(): Promise<void> {
    if (!this.refs) return;
    for (let round = 0; round < 2 && (round === 0 || this.hasDirtyMetadata()); round++) await this.commit();
    await this.port.fsync();
  }

  private hasDirtyMetadata(): boolean {
    return this.refs!.dirty || this.pendingFrees.length > 0;
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.track(async () => {
      const release = await this.lockRange(offset, length, false);
      try {
        return await this.statusLocked(offset, length);
      } finally {
        release();
      }
    });
  }

  /**
   * Refuses new requests, waits for those in flight, gives the unused allocation pool back,
   * commits the frees and counts and closes the file. No I/O follows on it.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (this.active > 0) await new Promise<void>((resolve) => (this.drained = resolve));
      await this.reserving?.catch(() => undefined); // one started ahead of need
      if (this.refs) {
        for (const run of this.pool.splice(0)) for (let k = 0; k < run.count; k++) this.refs.decrement(run.offset / this.cs + k);
        this.poolCount = 0;
        await this.commitAndSync();
        // Give back the file length the pool added, keeping every cluster still counted.
        const end = Math.max(this.openLength, this.refs.usedEnd);
        if (end < this.fileLength) await this.port.truncate(end);
      }
    } finally {
      await this.port.close();
      await this.backing?.close();
    }
  }

  /**
   * What the in-image bitmap store (src/bitmaps/store-qcow2.ts) needs from a writable image:
   * cluster allocation and freeing with the image's own refcounts, a durable metadata commit,
   * and a rewrite of the header extension area. Null for read-only images and for v2 images
   * (which have no autoclear field, so cannot hold trusted bitmaps).
   */
  bitmapHost(): Qcow2BitmapHost | null {
    const refs = this.refs;
    if (!refs || !this.v3) return null;
    return {
      path: this.path,
      port: this.port,
      clusterSize: this.cs,
      diskSize: this.size,
      bitmapsExtension: this.extensions.bitmaps ?? null,
      bitmapsConsistentAtOpen: this.bitmapsConsistentAtOpen,
      allocateClusters: (n) => this.allocateContiguous(n),
      freeClusters: (offset, n) => {
        for (let k = 0; k < n; k++) this.pendingFrees.push(offset / this.cs + k);
      },
      commitMetadata: async () => {
        await this.commit();
        await this.port.fsync();
      },
      // In the commit chain: a commit may be rewriting header fields meanwhile.
      writeBitmapsExtension: (ext) => {
        const run = this.commitChain.then(() => this.writeBitmapsExtension(ext));
        this.commitChain = run.catch(() => undefined);
        return run;
      },
    };
  }

  /**
   * `n` contiguous clusters with refcount 1 (bitmap tables and directories span clusters).
   * Shorter runs found on the way are given back; past the end of the file a run always fits.
   */
  private allocateContiguous(n: number): number {
    const refs = this.refs!;
    const partial: { offset: number; count: number }[] = [];
    for (;;) {
      const run = refs.allocateRun(n);
      if (run.count === n) {
        for (const p of partial) for (let k = 0; k < p.count; k++) refs.decrement(p.offset / this.cs + k);
        for (let k = 0; k < n; k++) this.punched.delete(run.offset / this.cs + k);
        return run.offset;
      }
      partial.push(run);
    }
  }

  /**
   * Rewrites the header extension area with `ext` as the bitmaps extension (none when null),
   * keeping every other extension's bytes and the backing file name, and sets the bitmaps
   * autoclear bit exactly when `ext` is given. Durable when it resolves.
   */
  private async writeBitmapsExtension(ext: BitmapsExtension | null): Promise<void> {
    const h = this.header;
    const cluster0 = await this.port.readAt(Buffer.alloc(this.cs), 0);
    const kept: Buffer[] = [];
    for (let off = h.headerLength; off + 8 <= this.cs; ) {
      const type = cluster0.readUInt32BE(off);
      const len = cluster0.readUInt32BE(off + 4);
      if (type === EXT_END) break;
      const next = off + 8 + Math.ceil(len / 8) * 8;
      if (type !== EXT_BITMAPS) kept.push(cluster0.subarray(off, next));
      off = next;
    }
    if (ext) kept.push(encodeExtension(EXT_BITMAPS, encodeBitmapsExtensionData(ext)));
    kept.push(encodeExtension(EXT_END, Buffer.alloc(0)));
    const backingName = h.backingFileOffset !== 0 ? Buffer.from(cluster0.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize)) : null;
    const area = Buffer.concat(kept);
    const backingOffset = backingName ? h.headerLength + area.length : 0;
    if (h.headerLength + area.length + (backingName?.length ?? 0) > this.cs) {
      throw new NbddError(Errno.ENOSPC, `${this.path}: no room in the first cluster for the bitmaps extension`);
    }
    const autoclear = ext ? h.autoclearFeatures | AUTOCLEAR_BITMAPS : h.autoclearFeatures & ~AUTOCLEAR_BITMAPS;
    const backingField = Buffer.alloc(8);
    writeU64(backingField, 0, backingOffset);
    const autoclearField = Buffer.alloc(8);
    autoclearField.writeBigUInt64BE(autoclear);
    await this.port.writeAt(Buffer.concat([area, ...(backingName ? [backingName] : [])]), h.headerLength);
    await this.port.writeAt(backingField, 8);
    await this.port.writeAt(autoclearField, 88);
    await this.port.fsync();
    h.backingFileOffset = backingOffset;
    h.autoclearFeatures = autoclear;
    if (ext) this.extensions.bitmaps = { ...ext };
    else delete this.extensions.bitmaps;
  }

  /**
   * The bitmap directory named by the bitmaps extension (empty without one), for `describeQcow2`;
   * the bitmaps themselves are kept by src/bitmaps/store-qcow2.ts through `bitmapHost()`.
   */
  async readBitmapDirectory(): Promise<BitmapDirectoryEntry[]> {
    const ext = this.extensions.bitmaps;
    if (!ext) return [];
    if (ext.directorySize > MAX_BITMAP_DIRECTORY_BYTES) throw corrupt(`bitmap directory of ${ext.directorySize} bytes exceeds ${MAX_BITMAP_DIRECTORY_BYTES}`);
    if (ext.directoryOffset % this.cs !== 0 || ext.directoryOffset + ext.directorySize > this.fileLength) {
      throw corrupt(`bitmap directory at ${hex(ext.directoryOffset)} is unaligned or past the end of the file`);
    }
    const dir = await this.port.readAt(Buffer.alloc(ext.directorySize), ext.directoryOffset);
    return decodeBitmapDirectory(dir, ext.nbBitmaps);
  }

  // ---------------------------------------------------------------- locking and lookups

  private lockRange(offset: number, length: number, exclusive: boolean): Promise<() => void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.cs);
    return this.lock.acquire(first, last, exclusive);
  }

  private assertWritable(): void {
    if (!this.refs) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
    if (this.commitError) throw new NbddError(Errno.EIO, `${this.path}: an earlier metadata commit failed: ${messageOf(this.commitError)}`);
  }

  private l1Offset(l1i: number): number {
    return entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4));
  }

  /** The L2 table of `l1i`, or null when the L1 entry is empty. Loads share one read. */
  private l2(l1i: number): L2Table | null | Promise<L2Table> {
    const cached = this.l2Cache.get(l1i);
    if (cached) return cached;
    const offset = this.l1Offset(l1i);
    if (offset === 0) return null;
    let pending = this.loading.get(l1i);
    if (!pending) {
      pending = this.loadL2(l1i, offset);
      this.loading.set(l1i, pending);
    }
    return pending;
  }

  private async loadL2(l1i: number, offset: number): Promise<L2Table> {
    try {
      const data = await this.port.readAt(Buffer.allocUnsafe(this.cs), offset);
      const table: L2Table = { offset, data, pins: 0 };
      this.l2Cache.insert(l1i, table);
      return table;
    } finally {
      this.loading.delete(l1i);
    }
  }

  /** The L2 table of `l1i`, allocating an empty one when the L1 entry is empty. */
  private async l2ForWrite(l1i: number): Promise<L2Table> {
    for (;;) {
      const found = await this.l2(l1i);
      if (found) {
        if (found.ready) await found.ready;
        const hi = this.l1.readUInt32BE(l1i * 8);
        if ((hi & ENTRY_COPIED_HI) === 0) {
          if (this.refs!.get(found.offset / this.cs) !== 1) throw new NbddError(Errno.ENOTSUP, `${this.path}: L2 table at ${hex(found.offset)} is shared (snapshots); writing is not supported`);
          writeEntry(this.l1, l1i * 8, found.offset, true, false);
          await this.writeL1(l1i);
        }
        return found;
      }
      // Another request may have created the table while this one waited: look again.
      if (this.l1Offset(l1i) !== 0) continue;
      if (this.poolCount === 0) {
        await this.reservePool(1);
        continue;
      }
      return this.createL2(l1i); // synchronous up to its first await: no other request interleaves
    }
  }

  /**
   * Takes a cluster from the pool for a new, empty L2 table of `l1i` and links it: the table is
   * written and made durable before the L1 entry naming it is written, so the file never names a
   * table whose cluster still holds old bytes. Writers of the table wait for that (`ready`);
   * readers see the empty table in memory at once.
   */
  private async createL2(l1i: number): Promise<L2Table> {
    const { offset } = this.takeClusters(1);
    this.metadataClusters.add(offset / this.cs);
    this.punched.delete(offset / this.cs);
    const table: L2Table = { offset, data: Buffer.alloc(this.cs), pins: 1 };
    this.l2Cache.insert(l1i, table);
    writeEntry(this.l1, l1i * 8, offset, true, false);
    const link = async (): Promise<void> => {
      await this.port.writeAt(table.data, offset); // still empty: writers wait for `ready`
      await this.port.fsync();
      await this.writeL1(l1i);
    };
    table.ready = link();
    try {
      await table.ready;
    } catch (err) {
      this.commitError ??= err;
      throw new NbddError(Errno.EIO, `${this.path}: writing a new L2 table failed: ${messageOf(err)}`);
    } finally {
      table.pins--;
      table.ready = undefined;
    }
    return table;
  }

  private async writeL1(l1i: number): Promise<void> {
    await this.port.writeAt(Buffer.from(this.l1.subarray(l1i * 8, l1i * 8 + 8)), this.header.l1TableOffset + l1i * 8);
    this.unsyncedData = true;
  }

  /**
   * One fdatasync shared by the requests of this turn that wait for their data to be durable
   * before their L2 entries are written. A request joins only a sync not yet started, so its data,
   * written before it joined, is covered.
   */
  private syncData(): Promise<void> {
    this.dataSync ??= new Promise<void>((resolve) => setImmediate(resolve)).then(() => {
      this.dataSync = null;
      return this.port.fsync();
    });
    return this.dataSync;
  }

  // ---------------------------------------------------------------- allocation pool

  /** Takes up to `max` contiguous clusters from the pool (lowest first); the caller checked it is not empty. */
  private takeClusters(max: number): { offset: number; count: number } {
    const run = this.pool[0]!;
    const count = Math.min(max, run.count);
    const offset = run.offset;
    run.offset += count * this.cs;
    run.count -= count;
    if (run.count === 0) this.pool.shift();
    this.poolCount -= count;
    // Refill ahead, so allocating writes seldom wait for a reservation's fdatasync.
    if (!this.reserving && !this.closed && this.poolCount < this.reserveChunk / 2) {
      this.reservePool(0).catch((err) => log.debug(`${this.path}: reserving clusters ahead failed: ${messageOf(err)}`));
    }
    return { offset, count };
  }

  /** Resolves once a reservation (started now, or the one running) has filled the pool. */
  private reservePool(need: number): Promise<void> {
    this.reserving ??= this.reserve(need).finally(() => {
      this.reserving = null;
    });
    return this.reserving;
  }

  /**
   * Allocates at least `need` clusters (more each time, see FIRST_RESERVE_BYTES), writes their
   * counts through a commit, extends the file over them and fdatasyncs, and only then adds them
   * to the pool: an L2 entry
   * written later can never reach the disk before the count of its cluster. A daemon killed with
   * a pool in hand leaks those clusters (`qemu-img check -r leaks` reclaims them); close returns them.
   */
  private async reserve(need: number): Promise<void> {
    const want = Math.max(need, this.reserveChunk);
    this.reserveChunk = Math.min(this.maxReserve, this.reserveChunk * 4);
    const runs: { offset: number; count: number }[] = [];
    for (let got = 0; got < want; ) {
      const run = this.refs!.allocateRun(want - got);
      runs.push(run);
      got += run.count;
    }
    await this.commit();
    // The file reaches past every pool cluster before any is referenced: a reference past the end
    // of the file is an error to `qemu-img check`, even where the cluster would read as zeroes.
    const hostEnd = this.refs!.hostEnd;
    if (hostEnd > this.fileLength) {
      await this.port.truncate(hostEnd);
      this.fileLength = hostEnd;
    }
    await this.port.fsync();
    for (const run of runs) this.addToPool(run.offset, run.count);
  }

  /** Adds clusters to the pool, keeping its runs sorted and merged. */
  private addToPool(offset: number, count: number): void {
    const pool = this.pool;
    let i = pool.length;
    while (i > 0 && pool[i - 1]!.offset > offset) i--;
    const before = pool[i - 1];
    const after = pool[i];
    const end = offset + count * this.cs;
    if (before && before.offset + before.count * this.cs === offset) {
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
   * Validates a data cluster offset read from an L2 entry. With subclusters the file may end inside
   * the last data cluster, so only its start must lie inside the file.
   */
  private checkDataHost(host: number, ci: number): void {
    if (host % this.cs !== 0) throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} has unaligned host offset ${hex(host)}`);
    if (host >= Math.max(this.fileLength, this.refs?.hostEnd ?? 0)) {
      throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} points at ${hex(host)}, past the end of the file (${this.fileLength} bytes)`);
    }
  }

  private isExclusive(hi: number, host: number): boolean {
    return (hi & ENTRY_COPIED_HI) !== 0 || this.refs!.get(host / this.cs) === 1;
  }

  /** Host cluster indices a compressed descriptor occupies (each holds one reference). */
  private compressedClusters(hi: number, lo: number): number[] {
    const { offset, length } = decodeCompressed(hi, lo, this.g.clusterBits);
    const out: number[] = [];
    for (let c = Math.floor(offset / this.cs); c <= Math.floor((offset + length - 1) / this.cs); c++) out.push(c);
    return out;
  }

  // ---------------------------------------------------------------- reads

  /**
   * Fills `buf` from guest `offset`, merging the walk into runs: contiguous host ranges become one
   * file read, contiguous backing ranges one backing read. The caller holds the range lock.
   */
  private async readLocked(buf: Buffer, offset: number): Promise<void> {
    const jobs: Promise<unknown>[] = [];
    let kind = RUN_NONE;
    let runAt = 0; // position in buf
    let runLen = 0;
    let runAddr = 0; // host offset (data) or guest offset (backing)
    const flushRun = (): void => {
      if (kind === RUN_DATA) jobs.push(this.port.readAt(buf.subarray(runAt, runAt + runLen), runAddr));
      else if (kind === RUN_ZERO) buf.fill(0, runAt, runAt + runLen);
      else if (kind === RUN_BACKING) jobs.push(this.readBacking(buf.subarray(runAt, runAt + runLen), runAddr));
      kind = RUN_NONE;
    };
    const add = (k: number, at: number, len: number, addr: number): void => {
      if (k === kind && runAt + runLen === at && (k === RUN_ZERO || runAddr + runLen === addr)) {
        runLen += len;
        return;
      }
      flushRun();
      kind = k;
      runAt = at;
      runLen = len;
      runAddr = addr;
    };
    try {
      const end = offset + buf.length;
      const tableSpan = this.g.l2Entries * this.cs;
      let pos = offset;
      while (pos < end) {
        const l1i = Math.floor(pos / tableSpan);
        const tableEnd = Math.min(end, (l1i + 1) * tableSpan);
        const table = await this.l2(l1i);
        if (!table) {
          add(RUN_BACKING, pos - offset, tableEnd - pos, pos);
          pos = tableEnd;
          continue;
        }
        const data = table.data;
        while (pos < tableEnd) {
          const ci = Math.floor(pos / this.cs);
          const clusterStart = ci * this.cs;
          const clusterEnd = Math.min(tableEnd, clusterStart + this.cs);
          const e = (ci - l1i * this.g.l2Entries) * this.g.l2EntrySize;
          const hi = data.readUInt32BE(e);
          const lo = data.readUInt32BE(e + 4);
          if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
            flushRun();
            jobs.push(this.readCompressed(hi, lo, buf.subarray(pos - offset, clusterEnd - offset), pos - clusterStart));
            pos = clusterEnd;
            continue;
          }
          const host = entryOffset(hi, lo);
          if (host !== 0) this.checkDataHost(host, ci);
          if (!this.g.extendedL2) {
            const n = clusterEnd - pos;
            if (this.v3 && (lo & ENTRY_ZERO_LO) !== 0) add(RUN_ZERO, pos - offset, n, 0);
            else if (host === 0) add(RUN_BACKING, pos - offset, n, pos);
            else add(RUN_DATA, pos - offset, n, host + pos - clusterStart);
            pos = clusterEnd;
            continue;
          }
          const zeroBits = data.readUInt32BE(e + 8);
          const allocBits = data.readUInt32BE(e + 12);
          if ((zeroBits & allocBits) !== 0) throw corrupt(`L2 entry of guest offset ${hex(clusterStart)} has subclusters both allocated and zero`);
          if (host === 0 && allocBits !== 0) throw corrupt(`L2 entry of guest offset ${hex(clusterStart)} has allocated subclusters but no host cluster`);
          while (pos < clusterEnd) {
            const sc = Math.floor((pos - clusterStart) / this.g.unitSize);
            const n = Math.min(clusterEnd, clusterStart + (sc + 1) * this.g.unitSize) - pos;
            if ((allocBits >>> sc) & 1) add(RUN_DATA, pos - offset, n, host + pos - clusterStart);
            else if ((zeroBits >>> sc) & 1) add(RUN_ZERO, pos - offset, n, 0);
            else add(RUN_BACKING, pos - offset, n, pos);
            pos += n;
          }
        }
      }
      flushRun();
    } catch (err) {
      await Promise.allSettled(jobs);
      throw err;
    }
    await Promise.all(jobs);
  }

  /** Reads guest bytes the backing chain supplies; past the backing file's end they are zeroes. */
  private async readBacking(buf: Buffer, offset: number): Promise<void> {
    const inBacking = this.backing ? Math.max(0, Math.min(buf.length, this.backing.size - offset)) : 0;
    if (inBacking > 0) await this.backing!.readInto(buf.subarray(0, inBacking), offset);
    if (inBacking < buf.length) buf.fill(0, inBacking);
  }

  private async readCompressed(hi: number, lo: number, target: Buffer, inCluster: number): Promise<void> {
    const { offset, length } = decodeCompressed(hi, lo, this.g.clusterBits);
    if (offset >= this.fileLength) throw corrupt(`compressed cluster at ${hex(offset)} lies past the end of the file`);
    const src = await this.port.readAt(Buffer.allocUnsafe(length), offset);
    const cluster = await decompressCluster(this.header.compressionType, src, this.cs);
    cluster.copy(target, 0, inCluster, inCluster + target.length);
  }

  /** Reads guest bytes for copy-on-write; parts past the virtual size read as zeroes. */
  private async readForCow(guestOffset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    const n = Math.max(0, Math.min(length, this.size - guestOffset));
    if (n > 0) await this.readLocked(buf.subarray(0, n), guestOffset);
    return buf;
  }

  // ---------------------------------------------------------------- writes

  /**
   * Decides how one cluster takes new data [a, b): in place when its host cluster is normal and
   * exclusively ours, else into a fresh cluster with the untouched parts copied from the old
   * mapping (whole cluster; with extended L2 only the partly written subclusters of an empty one).
   */
  private planWrite(table: L2Table, l1i: number, ci: number, a: number, b: number, dataOffset: number): WritePlan {
    const entry = (ci - l1i * this.g.l2Entries) * this.g.l2EntrySize;
    const hi = table.data.readUInt32BE(entry);
    const lo = table.data.readUInt32BE(entry + 4);
    const plan: WritePlan = { table, entry, ci, a, b, spanStart: 0, spanEnd: this.cs, host: 0, fresh: true, zeroHost: false, zeroSource: false, changed: true, freeOld: [], alloc: ALL_UNITS, zero: 0, dataOffset };
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      plan.freeOld = this.compressedClusters(hi, lo);
      return plan;
    }
    const host = entryOffset(hi, lo);
    if (host !== 0) this.checkDataHost(host, ci);
    const exclusive = host !== 0 && this.isExclusive(hi, host);
    const zeroFlag = this.v3 && !this.g.extendedL2 && (lo & ENTRY_ZERO_LO) !== 0;
    plan.zeroSource = zeroFlag || (host === 0 && (this.backing === null || ci * this.cs >= this.backing.size));
    if (!this.g.extendedL2) {
      if (exclusive) {
        plan.fresh = false;
        plan.host = host;
        if (!zeroFlag) {
          plan.spanStart = a;
          plan.spanEnd = b;
          plan.changed = (hi & ENTRY_COPIED_HI) === 0;
        }
      } else if (host !== 0) {
        plan.freeOld = [host / this.cs];
      }
      return plan;
    }
    const u = this.g.unitSize;
    const zeroBits = table.data.readUInt32BE(entry + 8);
    const allocBits = table.data.readUInt32BE(entry + 12);
    const su = Math.floor(a / u);
    const eu = Math.ceil(b / u);
    const mask = unitMask(su, eu);
    if (host !== 0 && !exclusive) {
      plan.freeOld = [host / this.cs];
      return plan;
    }
    if (host === 0 && allocBits !== 0) throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} has allocated subclusters but no host cluster`);
    plan.alloc = (allocBits | mask) >>> 0;
    plan.zero = (zeroBits & ~mask) >>> 0;
    plan.spanStart = (allocBits >>> su) & 1 ? a : su * u;
    plan.spanEnd = (allocBits >>> (eu - 1)) & 1 ? b : eu * u;
    if (host !== 0) {
      plan.fresh = false;
      plan.host = host;
      plan.changed = (hi & ENTRY_COPIED_HI) === 0 || plan.alloc !== allocBits || plan.zero !== zeroBits;
    }
    return plan;
  }

  private async writeLocked(offset: number, data: Buffer, w: EntryWrites): Promise<void> {
    const plans: WritePlan[] = [];
    const pinned: L2Table[] = [];
    try {
      const tableSpan = this.g.l2Entries * this.cs;
      const end = offset + data.length;
      let pos = offset;
      while (pos < end) {
        const l1i = Math.floor(pos / tableSpan);
        const table = await this.l2ForWrite(l1i);
        table.pins++;
        pinned.push(table);
        const tableEnd = Math.min(end, (l1i + 1) * tableSpan);
        while (pos < tableEnd) {
          const ci = Math.floor(pos / this.cs);
          const clusterStart = ci * this.cs;
          const b = Math.min(tableEnd, clusterStart + this.cs) - clusterStart;
          plans.push(this.planWrite(table, l1i, ci, pos - clusterStart, b, pos - offset));
          pos = clusterStart + b;
        }
      }
      const fresh = plans.reduce((n, p) => n + (p.fresh ? 1 : 0), 0);
      while (this.poolCount < fresh) await this.reservePool(fresh);
      this.allocateFresh(plans); // synchronous after the check above
      const cow = plans.filter((p) => p.spanStart < p.a || p.b < p.spanEnd);
      if (cow.length > 0) await Promise.all(cow.map((p) => this.fillCow(p)));
      // An entry naming a cluster whose unwritten bytes may differ from the old contents (copy-on-
      // write from a backing file or compressed cluster, a reused unpunched cluster, subclusters)
      // must not reach the disk before the data: after a power loss the guest would see bytes it
      // never wrote. A fresh zero cluster replacing zeroes reads as the old contents until its data
      // lands, so its entry goes out together with the data (the range lock keeps readers away).
      if (plans.some((p) => p.changed && !(p.fresh && p.zeroHost && p.zeroSource))) {
        await this.writeData(plans, data);
        this.unsyncedData = true;
        await this.syncData();
        this.setEntries(plans, w);
      } else {
        this.setEntries(plans, w);
        const [written, linked] = await Promise.allSettled([this.writeData(plans, data), this.writeEntries(w)]);
        this.unsyncedData = true;
        if (written.status === 'rejected') throw written.reason;
        if (linked.status === 'rejected') throw linked.reason;
      }
    } finally {
      for (const t of pinned) t.pins--;
    }
  }

  /** Points the L2 entries of the plans that change one at their (new) host clusters. */
  private setEntries(plans: WritePlan[], w: EntryWrites): void {
    for (const p of plans) {
      if (!p.changed) continue;
      const d = p.table.data;
      writeEntry(d, p.entry, p.host, true, false);
      if (this.g.extendedL2) {
        d.writeUInt32BE(p.zero, p.entry + 8);
        d.writeUInt32BE(p.alloc, p.entry + 12);
      }
      w.touch(p.table, p.entry);
      for (const c of p.freeOld) w.frees.push(c);
    }
  }

  /** Gives every plan needing a fresh cluster one from the pool, contiguous for consecutive clusters. */
  private allocateFresh(plans: WritePlan[]): void {
    for (let i = 0; i < plans.length; ) {
      if (!plans[i]!.fresh) {
        i++;
        continue;
      }
      let j = i + 1;
      while (j < plans.length && plans[j]!.fresh && plans[j]!.ci === plans[j - 1]!.ci + 1) j++;
      for (let k = i; k < j; ) {
        const run = this.takeClusters(j - k);
        for (let m = 0; m < run.count; m++) {
          const p = plans[k + m]!;
          p.host = run.offset + m * this.cs;
          p.zeroHost = this.readsAsZero(p.host / this.cs);
          this.punched.delete(p.host / this.cs);
        }
        k += run.count;
      }
      i = j;
    }
  }

  /**
   * Reads the copy-on-write head and tail of a plan. When they are zeroes and the fresh host
   * cluster is known to read as zeroes already, they are dropped and only the new data is written
   * (what QEMU does with a zero-write of the cluster first); when the old mapping is known to be
   * zeroes, nothing is read.
   */
  private async fillCow(p: WritePlan): Promise<void> {
    if (p.zeroHost && p.zeroSource) {
      p.spanStart = p.a;
      p.spanEnd = p.b;
      return;
    }
    const guest = p.ci * this.cs;
    const [head, tail] = await Promise.all([
      p.spanStart < p.a ? this.readForCow(guest + p.spanStart, p.a - p.spanStart) : undefined,
      p.b < p.spanEnd ? this.readForCow(guest + p.b, p.spanEnd - p.b) : undefined,
    ]);
    if (p.zeroHost && isZero(head) && isZero(tail)) {
      p.spanStart = p.a;
      p.spanEnd = p.b;
      return;
    }
    p.head = head;
    p.tail = tail;
  }

  /**
   * Whether a free host cluster is known to hold zeroes: past the file's end at open (never
   * written since, or punched when freed), or punched by this process. Once a punch fails, nothing
   * is assumed.
   */
  private readsAsZero(cluster: number): boolean {
    return this.punchWorks && (cluster >= this.zeroFrom || this.punched.has(cluster));
  }

  /** Writes the planned spans, one (vectored) file write per run of contiguous host bytes. */
  private async writeData(plans: WritePlan[], data: Buffer): Promise<void> {
    const writes: Promise<void>[] = [];
    let start = -1;
    let end = -1;
    let bufs: Buffer[] = [];
    const flushGroup = (): void => {
      if (bufs.length === 1) writes.push(this.port.writeAt(bufs[0]!, start));
      else if (bufs.length > 1) writes.push(this.port.writevAt(bufs, start));
      bufs = [];
    };
    for (const p of plans) {
      if (!p.fresh && this.metadataClusters.has(p.host / this.cs)) {
        throw corrupt(`L2 entry of guest offset ${hex(p.ci * this.cs)} points at metadata cluster ${hex(p.host)}`);
      }
      const at = p.host + p.spanStart;
      if (at !== end) {
        flushGroup();
        start = at;
      }
      if (p.head) bufs.push(p.head);
      bufs.push(data.subarray(p.dataOffset, p.dataOffset + p.b - p.a));
      if (p.tail) bufs.push(p.tail);
      end = p.host + p.spanEnd;
    }
    flushGroup();
    await Promise.all(writes);
  }

  /**
   * Write-zeroes: whole clusters (whole subclusters with extended L2) change metadata only;
   * partial ones are written as zero data. Without NO_HOLE an allocation is released; with it an
   * exclusively owned cluster is kept and flagged zero (v3). v2 has no zero flag: a cluster may be
   * deallocated only when no backing file shows through.
   */
  private async zeroLocked(offset: number, length: number, noHole: boolean, w: EntryWrites): Promise<void> {
    const partial: [number, number][] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const ci = Math.floor(pos / this.cs);
      const clusterStart = ci * this.cs;
      const a = pos - clusterStart;
      const clusterEnd = Math.min(end, clusterStart + this.cs);
      const b = clusterEnd - clusterStart;
      // The cluster counts as wholly covered when the rest lies past the virtual size.
      const whole = a === 0 && (b === this.cs || clusterEnd >= this.size);
      pos = clusterEnd;
      if (this.g.extendedL2) {
        await this.zeroSubclusters(ci, a, whole ? this.cs : b, noHole, partial, w);
      } else if (!whole || (!this.v3 && (this.backing !== null || noHole))) {
        partial.push([clusterStart + a, b - a]);
      } else {
        const l1i = Math.floor(ci / this.g.l2Entries);
        if (this.l1Offset(l1i) === 0 && !this.backing) continue;
        const table = await this.l2ForWrite(l1i);
        const e = (ci - l1i * this.g.l2Entries) * 8;
        const hi = table.data.readUInt32BE(e);
        const lo = table.data.readUInt32BE(e + 4);
        const keep = this.v3 && noHole && (hi & ENTRY_COMPRESSED_HI) === 0 && entryOffset(hi, lo) !== 0 && this.isExclusive(hi, entryOffset(hi, lo));
        if (keep) {
          writeEntry(table.data, e, entryOffset(hi, lo), true, true);
        } else {
          this.releaseEntry(hi, lo, w);
          writeEntry(table.data, e, 0, false, this.v3);
        }
        w.touch(table, e);
      }
    }
    for (const [at, n] of partial) await this.writeLocked(at, Buffer.alloc(n), w);
  }

  /** Extended L2 zeroing of [a, b) in cluster `ci`: subcluster zero bits, zero data for the rest. */
  private async zeroSubclusters(ci: number, a: number, b: number, noHole: boolean, partial: [number, number][], w: EntryWrites): Promise<void> {
    const u = this.g.unitSize;
    const clusterStart = ci * this.cs;
    const su = Math.ceil(a / u);
    const eu = Math.floor(b / u);
    if (su >= eu) {
      partial.push([clusterStart + a, Math.min(b, this.size - clusterStart) - a]);
      return;
    }
    if (a < su * u) partial.push([clusterStart + a, su * u - a]);
    if (eu * u < b) partial.push([clusterStart + eu * u, Math.min(b, this.size - clusterStart) - eu * u]);
    const l1i = Math.floor(ci / this.g.l2Entries);
    if (this.l1Offset(l1i) === 0 && !this.backing) return;
    const table = await this.l2ForWrite(l1i);
    const e = (ci - l1i * this.g.l2Entries) * 16;
    const hi = table.data.readUInt32BE(e);
    const lo = table.data.readUInt32BE(e + 4);
    const mask = unitMask(su, eu);
    if ((hi & ENTRY_COMPRESSED_HI) !== 0 || (mask === ALL_UNITS && !noHole)) {
      if ((hi & ENTRY_COMPRESSED_HI) !== 0 && mask !== ALL_UNITS) {
        // A compressed cluster has no subclusters: zero its part by rewriting it.
        partial.push([clusterStart + su * u, (eu - su) * u]);
        return;
      }
      this.releaseEntry(hi, lo, w);
      writeEntry(table.data, e, 0, false, false);
      table.data.writeUInt32BE(ALL_UNITS, e + 8);
      table.data.writeUInt32BE(0, e + 12);
    } else {
      table.data.writeUInt32BE((table.data.readUInt32BE(e + 8) | mask) >>> 0, e + 8);
      table.data.writeUInt32BE((table.data.readUInt32BE(e + 12) & ~mask) >>> 0, e + 12);
    }
    w.touch(table, e);
  }

  /**
   * Discard, as QEMU does it for NBD/guest discards: whole clusters only (plus a partial last
   * cluster at the end of the image); afterwards they read as zeroes on v3 (zero flag or zero
   * bits when a backing file could show through). v2 images with a backing file ignore discards,
   * since freeing would expose stale backing data.
   */
  private async trimLocked(offset: number, length: number, w: EntryWrites): Promise<void> {
    if (!this.v3 && this.backing) return;
    const end = offset + length;
    for (let ci = Math.ceil(offset / this.cs); ci * this.cs < end; ci++) {
      const clusterStart = ci * this.cs;
      if (clusterStart + this.cs > end && end < this.size) break;
      const l1i = Math.floor(ci / this.g.l2Entries);
      if (this.l1Offset(l1i) === 0 && !this.backing) continue;
      const table = await this.l2ForWrite(l1i);
      const e = (ci - l1i * this.g.l2Entries) * this.g.l2EntrySize;
      this.releaseEntry(table.data.readUInt32BE(e), table.data.readUInt32BE(e + 4), w);
      if (this.g.extendedL2) {
        writeEntry(table.data, e, 0, false, false);
        table.data.writeUInt32BE(this.backing ? ALL_UNITS : 0, e + 8);
        table.data.writeUInt32BE(0, e + 12);
      } else {
        writeEntry(table.data, e, 0, false, this.v3 && this.backing !== null);
      }
      w.touch(table, e);
    }
  }

  /** Records the host clusters an entry holds (normal or compressed), to free once it is rewritten. */
  private releaseEntry(hi: number, lo: number, w: EntryWrites): void {
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      for (const c of this.compressedClusters(hi, lo)) w.frees.push(c);
      return;
    }
    const host = entryOffset(hi, lo);
    if (host !== 0) w.frees.push(host / this.cs);
  }

  private async afterUpdate(options?: WriteOptions): Promise<void> {
    if (options?.fua) {
      await this.commitAndSync();
      return;
    }
    if (this.pendingFrees.length > 0) this.scheduleCommit();
  }

  // ---------------------------------------------------------------- commit

  private scheduleCommit(): void {
    if (this.commitScheduled) return;
    this.commitScheduled = true;
    setImmediate(() => {
      this.commitScheduled = false;
      if (this.closed) return; // close commits everything itself, before the file closes
      this.commit().catch((err) => log.error(`${this.path}: metadata commit failed: ${messageOf(err)}`));
    });
  }

  /** Runs one commit after any running one; rejects if it or an earlier one failed. */
  private commit(): Promise<void> {
    const run = this.commitChain.then(() => {
      if (this.commitError) throw new NbddError(Errno.EIO, `${this.path}: an earlier metadata commit failed: ${messageOf(this.commitError)}`);
      return this.commitOnce();
    });
    this.commitChain = run.catch((err) => {
      this.commitError ??= err;
    });
    return run;
  }

  /**
   * One commit: the refcount changes, then the frees. L2 and L1 entries are already in the file
   * (each request wrote its own). Steps, with an fdatasync between two whenever the earlier one
   * wrote something:
   *   refcount blocks (+ a moved refcount table) → refcount table entries or header →
   *   frees (punch, drop the counts in memory) → the dropped counts' blocks.
   * A cluster is freed only after the entries that dropped it are durable, and reused only after
   * that, so a crash at any point leaves at worst leaked clusters.
   */
  private async commitOnce(): Promise<void> {
    const refs = this.refs!;
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    let wrote = this.unsyncedData;
    this.unsyncedData = false;
    const port = this.port;
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
      const pointers = snap.table
        ? [{ at: 48, data: Buffer.concat([u64(snap.table.offset), u32(snap.table.clusters)]) }]
        : snap.tableEntries.map((t) => ({ at: this.header.refcountTableOffset + t.index * 8, data: u64(t.offset) }));
      if (pointers.length > 0) {
        await barrier();
        await Promise.all(pointers.map((w) => port.writeAt(w.data, w.at)));
        wrote = true;
      }
      if (snap.table) {
        this.header.refcountTableOffset = snap.table.offset;
        this.header.refcountTableClusters = snap.table.clusters;
      }
      return snap.oldTables.flatMap((t) => Array.from({ length: t.clusters }, (_, k) => t.offset / this.cs + k));
    };
    const toFree = frees.concat(await writeRefcounts());
    if (toFree.length === 0) return;
    await barrier();
    await this.applyFrees(toFree);
    // The dropped counts go to the file now, so a killed daemon leaks nothing it had freed.
    for (const c of await writeRefcounts()) this.pendingFrees.push(c);
  }

  /**
   * Punches clusters whose last reference goes, then drops the counts. An emptied cluster keeps a
   * count of 1 and joins the allocation pool while the pool is below its cap: its count on disk is
   * still at least 1, so it can be referenced again without another refcount sync, and the pool
   * hands out low clusters first, so freed space is reused before the file grows.
   */
  private async applyFrees(clusters: number[]): Promise<void> {
    const drops = new Map<number, number>();
    for (const c of clusters) drops.set(c, (drops.get(c) ?? 0) + 1);
    const emptied = [...drops].filter(([c, n]) => this.refs!.get(c) === n).map(([c]) => c).sort((x, y) => x - y);
    for (let i = 0; i < emptied.length; ) {
      let j = i + 1;
      while (j < emptied.length && emptied[j] === emptied[j - 1]! + 1) j++;
      // Punching saves space and lets fresh clusters skip zero copy-on-write; freeing works without.
      const done = await this.port.punchHole(emptied[i]! * this.cs, (j - i) * this.cs).then(
        () => true,
        () => false,
      );
      if (!done) this.punchWorks = false;
      for (let c = emptied[i]!; c <= emptied[j - 1]!; c++) {
        this.punched.add(c);
        this.metadataClusters.delete(c); // an old refcount table's cluster may hold data next
      }
      i = j;
    }
    const pooled = new Set<number>();
    for (const c of emptied) {
      if (this.closed || this.poolCount >= this.maxReserve) break; // close gives the pool back
      pooled.add(c);
      this.addToPool(c * this.cs, 1);
    }
    for (const c of clusters) {
      if (pooled.has(c)) pooled.delete(c); // keeps the cluster's last reference, as the pool's
      else this.refs!.decrement(c);
    }
  }

  // ---------------------------------------------------------------- block status

  private async statusLocked(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const push = (e: Extent): void => {
      const last = out[out.length - 1];
      if (last && last.hole === e.hole && last.zero === e.zero && last.depth === e.depth) last.length += e.length;
      else out.push({ ...e });
    };
    const fromBacking = async (at: number, n: number): Promise<void> => {
      const inBacking = this.backing ? Math.max(0, Math.min(n, this.backing.size - at)) : 0;
      for (let done = 0; done < inBacking; ) {
        const exts = await this.backing!.blockStatus(at + done, inBacking - done);
        for (const x of exts) {
          const len = Math.min(x.length, inBacking - done);
          push({ length: len, hole: x.hole, zero: x.zero, depth: x.depth ? x.depth + 1 : 0 });
          done += len;
          if (done >= inBacking) break;
        }
      }
      if (inBacking < n) push({ length: n - inBacking, hole: true, zero: true, depth: 0 });
    };
    const end = Math.min(offset + length, offset + MAX_STATUS_UNITS * this.g.unitSize);
    const tableSpan = this.g.l2Entries * this.cs;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / tableSpan);
      const tableEnd = Math.min(end, (l1i + 1) * tableSpan);
      const table = await this.l2(l1i);
      if (!table) {
        await fromBacking(pos, tableEnd - pos);
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const ci = Math.floor(pos / this.cs);
        const clusterStart = ci * this.cs;
        const clusterEnd = Math.min(tableEnd, clusterStart + this.cs);
        const e = (ci - l1i * this.g.l2Entries) * this.g.l2EntrySize;
        const hi = table.data.readUInt32BE(e);
        const lo = table.data.readUInt32BE(e + 4);
        const host = entryOffset(hi, lo);
        if ((hi & ENTRY_COMPRESSED_HI) !== 0 || (!this.g.extendedL2 && host !== 0 && !(this.v3 && lo & ENTRY_ZERO_LO))) {
          push({ length: clusterEnd - pos, hole: false, zero: false, depth: 1 });
          pos = clusterEnd;
        } else if (!this.g.extendedL2) {
          if (this.v3 && lo & ENTRY_ZERO_LO) push({ length: clusterEnd - pos, hole: true, zero: true, depth: 1 });
          else await fromBacking(pos, clusterEnd - pos);
          pos = clusterEnd;
        } else {
          const zeroBits = table.data.readUInt32BE(e + 8);
          const allocBits = table.data.readUInt32BE(e + 12);
          while (pos < clusterEnd) {
            const sc = Math.floor((pos - clusterStart) / this.g.unitSize);
            const n = Math.min(clusterEnd, clusterStart + (sc + 1) * this.g.unitSize) - pos;
            if ((allocBits >>> sc) & 1) push({ length: n, hole: false, zero: false, depth: 1 });
            else if ((zeroBits >>> sc) & 1) push({ length: n, hole: true, zero: true, depth: 1 });
            else await fromBacking(pos, n);
            pos += n;
          }
        }
      }
    }
    return out;
  }
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  writeU64(b, 0, n);
  return b;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** Reads the 8-byte refcount table entries into offsets, checking each is a sane block address. */
export function decodeRefcountTable(buf: Buffer, clusterSize: number, fileLength: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < buf.length; i += 8) {
    const off = readU64(buf, i, 'refcount table entry');
    if (off % clusterSize !== 0) throw corrupt(`refcount table entry ${i / 8} (${hex(off)}) is not cluster aligned`);
    if (off !== 0 && off + clusterSize > fileLength) throw corrupt(`refcount block ${i / 8} at ${hex(off)} lies past the end of the file`);
    out.push(off);
  }
  return out;
}

/** Validates the L1 table at open: reserved bits clear, L2 offsets aligned and inside the file. */
export function checkL1(l1: Buffer, clusterSize: number, fileLength: number): number[] {
  const tables: number[] = [];
  for (let i = 0; i < l1.length; i += 8) {
    const hi = l1.readUInt32BE(i);
    const lo = l1.readUInt32BE(i + 4);
    if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) throw corrupt(`L1 entry ${i / 8} has reserved bits set`);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (off % clusterSize !== 0) throw corrupt(`L1 entry ${i / 8}: L2 table offset ${hex(off)} is not cluster aligned`);
    if (off + clusterSize > fileLength) throw corrupt(`L1 entry ${i / 8}: L2 table at ${hex(off)} lies past the end of the file (${fileLength} bytes)`);
    tables.push(off);
  }
  return tables;
}
