/**
 * A qcow2 v2/v3 image as a `Backend` (and as an `ImageLayer` under another qcow2), on a FilePort.
 * This class is the adapter: it tracks requests (close waits for them), takes the range locks,
 * and hands each request to the part of the engine that does it:
 *
 *   format/       on-disk structures (header, extensions, tables, bitmaps), pure codecs
 *   state.ts      what the parts share about the open image
 *   l2-tables.ts  L2 table cache, load, create and link
 *   allocator.ts  the pool of pre-counted clusters
 *   mapping.ts    the L1 → L2 → subcluster walk, and block status over it
 *   read.ts       reads        write.ts  writes        discard.ts  write-zeroes and discard
 *   commit.ts     entry writes and the crash-safe commit order
 *   bitmap-host.ts  what the in-image bitmap store needs
 *
 * Concurrency: every request takes a range lock over the guest clusters it touches (shared for
 * reads and block status, exclusive for writes, zeroes and discards), granted in arrival order.
 * Shared metadata (L1, cached L2 tables, refcounts) changes only in synchronous code, so two
 * requests of one batch never allocate the same cluster or table.
 *
 * Durability (docs/qcow2.md, "Crash-safe ordering", and commit.ts): a request's data and its L2
 * entries are in the file before it completes; clusters come from a pool whose refcounts were
 * made durable beforehand; a new L2 table is durable before L1 names it; freed clusters are
 * released by a commit once the entries that dropped them are durable. FLUSH adds the fdatasync.
 */
import type { Backend, BackendCaps, Extent, WriteOptions, ZeroOptions } from '../../core/backend.js';
import { defaultCaps } from '../../core/backend.js';
import { Errno, NbddError } from '../../core/errors.js';
import type { Qcow2BitmapHost, Qcow2BitmapSource } from '../../bitmaps/store-qcow2.js';
import { Allocator } from './allocator.js';
import { bitmapHost, bitmapSource, prepareForWriting, readBitmapDirectory } from './bitmap-host.js';
import { Committer } from './commit.js';
import { CompressedWriter } from './compressed-write.js';
import { Discarder } from './discard.js';
import { EntryWrites } from './entry-writes.js';
import type { BitmapDirectoryEntry, Geometry, HeaderExtensions, Qcow2Header } from './format/index.js';
import { L2Tables } from './l2-tables.js';
import type { ImageLayer } from './layer.js';
import { blockStatus } from './mapping.js';
import { RangeLock } from './range-lock.js';
import { Reader } from './read.js';
import { ImageState, type Qcow2Parts } from './state.js';
import { Writer } from './write.js';
import { requestBuffers } from '../../core/request-buffers.js';
import type { Pipe } from '../../io/pipes.js';

export type { Qcow2Parts } from './state.js';

/**
 * The most L2 tables a cache holds, in bytes: 32 MiB, qemu's default on Linux, which covers 256
 * GiB of image with 64 KiB clusters. Tables are cached as they are used, so an image smaller than
 * that never holds more than its own tables (a 1 GiB image: 128 KiB).
 */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

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

  private readonly st: ImageState;
  private readonly tables: L2Tables;
  private readonly alloc: Allocator;
  private readonly committer: Committer;
  private readonly reader: Reader;
  private readonly writer: Writer;
  private readonly discarder: Discarder;
  private readonly compressed: CompressedWriter;
  private readonly lock = new RangeLock();
  /** Requests (and flushes) in flight; close waits for them before its last commit. */
  private active = 0;
  private drained: (() => void) | null = null;
  private prepared: Promise<void> | null = null;
  /** `prepared` succeeded: writes need not wait for it (one await less on every write). */
  private preparedDone = false;

  constructor(parts: Qcow2Parts) {
    const st = (this.st = new ImageState(parts));
    this.path = st.path;
    this.header = st.header;
    this.extensions = st.extensions;
    this.geometry = st.g;
    this.size = st.size;
    this.backing = st.backing;
    this.backingName = parts.backingName;
    this.committer = new Committer(st, () => this.alloc);
    this.alloc = new Allocator(st, () => this.committer.commit());
    this.tables = new L2Tables(st, this.alloc, parts.l2CacheBytes);
    this.reader = new Reader(st, this.tables);
    this.writer = new Writer(st, this.tables, this.alloc, this.reader, (w) => this.committer.writeEntries(w));
    this.discarder = new Discarder(st, this.tables, this.writer);
    this.compressed = new CompressedWriter(st, this.tables, this.alloc, this.writer, this.committer);
    const readOnly = st.refs === null;
    this.caps = defaultCaps({
      readOnly,
      flush: !readOnly,
      fua: !readOnly,
      trim: !readOnly,
      writeZeroes: !readOnly,
      blockStatus: true,
      multiConn: true,
      preferredBlockSize: Math.min(st.cs, 64 * 1024),
    });
    const spliceTo = st.port.spliceTo;
    if (spliceTo) {
      this.spliceRead = (offset, length, into) =>
        this.shared(offset, length, () => this.reader.spliceLocked(offset, length, (host, n) => spliceTo(into.writeFd, host, n)));
    }
  }

  /**
   * Where the file's port splices: a read that is one run of data clusters goes into the pipe by
   * reference (others reject with ENOTSUP; see Reader.spliceLocked). The pipe shows the clusters
   * as they are when the peer copies them. Only a request that overlaps the READ can change them:
   * a write in place, or a discard that frees them for another offset to take (the NBD READ's
   * result is then unspecified, as for any READ racing a write or a trim of its range).
   */
  readonly spliceRead?: (offset: number, length: number, into: Pipe) => Promise<void>;

  /**
   * Runs before the first write of any kind (data, flush, bitmap store): clears the autoclear bits
   * nbdd does not maintain, durably (bitmap-host.ts). Until then nothing is written, so an open
   * refused further up (bitmap limits, a store that cannot load) leaves the image as it was.
   */
  private beforeFirstWrite(): Promise<void> {
    this.prepared ??= prepareForWriting(this.st).then(
      () => {
        this.preparedDone = true;
      },
      (err) => {
        throw this.st.failed('clearing the autoclear bits', err);
      },
    );
    return this.prepared;
  }

  // ---------------------------------------------------------------- Backend

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = requestBuffers.take(length);
    await this.readInto(buf, offset);
    return buf;
  }

  readInto(buf: Buffer, offset: number): Promise<void> {
    return this.shared(offset, buf.length, () => this.reader.readLocked(buf, offset));
  }

  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.update(offset, data.length, options, (w) => this.writer.writeLocked(offset, data, w));
  }

  /**
   * Writes `data` at guest `offset` as compressed clusters where it covers whole clusters that
   * map nothing yet (compressed-write.ts); the rest as `write` does. For images written once, in
   * order — a backup point, a converted image — not for a live disk: a later write to a
   * compressed cluster moves it out into a plain one.
   */
  writeCompressed(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    if (offset < 0 || offset + data.length > this.size) return Promise.reject(new NbddError(Errno.EINVAL, `${this.path}: a compressed write of ${data.length} bytes at ${offset} ends past the image (${this.size} bytes)`));
    return this.update(offset, data.length, options, (w) => this.compressed.writeLocked(offset, data, w));
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    if (options?.fastZero) return Promise.reject(new NbddError(Errno.ENOTSUP, 'qcow2: fast zero is not offered'));
    return this.update(offset, length, options, (w) => this.discarder.zeroLocked(offset, length, options?.noHole === true, w));
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.update(offset, length, options, (w) => this.discarder.trimLocked(offset, length, w));
  }

  /** Commits all metadata changes and makes them and every completed write durable. */
  flush(): Promise<void> {
    return this.track(async () => {
      if (this.st.refs) await this.beforeFirstWrite();
      await this.committer.commitAndSync();
    });
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.shared(offset, length, () => blockStatus(this.st, this.tables, offset, length));
  }

  /**
   * Refuses new requests, waits for those in flight, gives the unused allocation pool back,
   * commits the frees and counts and closes the file. No I/O follows on it.
   */
  async close(): Promise<void> {
    const st = this.st;
    if (st.closed) return;
    st.closed = true;
    try {
      if (this.active > 0) await new Promise<void>((resolve) => (this.drained = resolve));
      await this.alloc.settled(); // one started ahead of need
      if (st.refs) {
        this.compressed.release();
        this.alloc.returnAll();
        await this.committer.commitAndSync();
        // Give back the file length the pool added, keeping every cluster still counted.
        const end = Math.max(st.openLength, st.refs.usedEnd);
        if (end < st.fileLength) await st.port.truncate(end);
      }
    } finally {
      await st.marking;
      await st.port.close();
      await this.backing?.close();
    }
  }

  /** Cached L2 tables still pinned: 0 whenever no request is in flight (a leak check for tests). */
  get pinnedL2Tables(): number {
    return this.tables.pinnedCount();
  }

  /** Where the image's bitmaps are read from (bitmap-host.ts), also when read-only; null for v2 images. */
  bitmapSource(): Qcow2BitmapSource | null {
    return bitmapSource(this.st);
  }

  /** What the in-image bitmap store needs (bitmap-host.ts); null for read-only and v2 images. */
  bitmapHost(): Qcow2BitmapHost | null {
    return bitmapHost(this.st, this.alloc, this.committer, () => this.beforeFirstWrite());
  }

  /** The bitmap directory as stored (for `describeQcow2`); empty without a bitmaps extension. */
  readBitmapDirectory(): Promise<BitmapDirectoryEntry[]> {
    return readBitmapDirectory(this.st);
  }

  // ---------------------------------------------------------------- tracking and locks

  /**
   * Runs `fn` as a request in flight: refused with ESHUTDOWN once close has begun, and counted
   * until it settles, so close commits only after every accepted request changed its metadata.
   */
  private async track<T>(fn: () => Promise<T>): Promise<T> {
    this.enter();
    try {
      return await fn();
    } finally {
      this.leave();
    }
  }

  /** A request begins (refused once close has begun); `leave` when it settles. */
  private enter(): void {
    if (this.st.closed) throw new NbddError(Errno.ESHUTDOWN, `${this.path} is closed`);
    this.active++;
  }

  private leave(): void {
    if (--this.active === 0) this.drained?.();
  }

  /**
   * A read or block status of guest [offset, offset + length) under a shared lock, tracked as
   * `track` does (without its closure: one async frame less on every read).
   */
  private async shared<T>(offset: number, length: number, locked: () => Promise<T>): Promise<T> {
    this.enter();
    try {
      const lock = this.lockRange(offset, length, false);
      const release = typeof lock === 'function' ? lock : await lock;
      try {
        return await locked();
      } finally {
        release();
      }
    } finally {
      this.leave();
    }
  }

  /**
   * A write, zero write or discard of guest [offset, offset + length), under an exclusive lock
   * held until the L2 entries it changed are in the file (even when it failed part way, since
   * memory already holds them).
   */
  private update(offset: number, length: number, options: WriteOptions | undefined, locked: (w: EntryWrites) => Promise<void>): Promise<void> {
    // Awaits only what is pending: each await of a settled promise still costs a microtask.
    return this.track(async () => {
      this.st.assertWritable();
      const lock = this.lockRange(offset, length, true); // first: locks go in arrival order
      const release = typeof lock === 'function' ? lock : await lock;
      const w = new EntryWrites(this.geometry.l2EntrySize, this.st.port);
      try {
        try {
          if (!this.preparedDone) await this.beforeFirstWrite();
          await locked(w);
        } finally {
          if (!w.empty) await this.committer.writeEntries(w);
        }
      } finally {
        release();
      }
      const after = this.committer.afterUpdate(options);
      if (after) await after;
    });
  }

  private lockRange(offset: number, length: number, exclusive: boolean): (() => void) | Promise<() => void> {
    const cs = this.st.cs;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / cs);
    return this.lock.take(first, last, exclusive);
  }
}
