/**
 * Compressed writes (`Qcow2Image.writeCompressed`, what a backup with `--compress` and
 * `qemu-img convert -c` write): each whole guest cluster that is still unallocated is compressed
 * with the image's compression type and its stream packed byte by byte after the previous one,
 * so one host cluster holds several streams and a stream may run on into the next host cluster,
 * as qemu packs them (qcow2_alloc_bytes). Everything else — partial clusters, clusters already
 * mapped, clusters that do not compress — takes the ordinary write path.
 *
 * Refcounts: a host cluster's count is the number of streams touching it, plus one while it is
 * the cluster being filled (the *tail*). That hold keeps a tail whose streams were all
 * overwritten from being freed, punched and handed out again while more streams are still to be
 * packed into it; it is released (through the commit's frees) when the tail moves on or the image
 * closes. A killed daemon leaks at most that one count.
 *
 * Order: the streams are written, the counts they added are committed, one fdatasync covers both,
 * and only then do the L2 entries change (memory, then file): an entry never names a stream that
 * is not on disk, nor a cluster whose count does not include it.
 */
import type { Allocator } from './allocator.js';
import type { Committer } from './commit.js';
import { checkCompressionType, compressCluster } from './compress.js';
import type { EntryWrites } from './entry-writes.js';
import { encodeCompressed, L2_ALLOC_BITS, L2_ZERO_BITS } from './format/index.js';
import type { L2Table, L2Tables } from './l2-tables.js';
import type { ImageState } from './state.js';
import { isZero, type Writer } from './write.js';

/** A stream must save at least this much of its cluster to be kept (else the cluster goes plain). */
const MIN_SAVING = 512;

interface Candidate {
  table: L2Table;
  entry: number; // byte index of the L2 entry in table.data
  ci: number; // guest cluster index
  data: Buffer; // the whole cluster, padded with zeroes past the image's end
  stream: Buffer | null;
  host: number;
}

export class CompressedWriter {
  /** The host cluster streams are packed into, and how many of its bytes are taken. */
  private tail: { cluster: number; used: number } | null = null;

  constructor(
    private readonly st: ImageState,
    private readonly tables: L2Tables,
    private readonly alloc: Allocator,
    private readonly writer: Writer,
    private readonly committer: Committer,
  ) {}

  /** Writes `data` at guest `offset`, compressing what can be. The caller holds the range lock. */
  async writeLocked(offset: number, data: Buffer, w: EntryWrites): Promise<void> {
    const { st } = this;
    const { cs, g } = st;
    checkCompressionType(st.header.compressionType);
    const end = offset + data.length;
    const candidates: Candidate[] = [];
    const plain: [number, number][] = []; // guest [from, to) for the ordinary path
    const pinned: L2Table[] = [];
    const addPlain = (from: number, to: number): void => {
      const last = plain[plain.length - 1];
      if (last && last[1] === from) last[1] = to;
      else if (from < to) plain.push([from, to]);
    };
    try {
      for (let pos = offset; pos < end; ) {
        const ci = Math.floor(pos / cs);
        const clusterEnd = Math.min((ci + 1) * cs, st.size);
        const to = Math.min(end, clusterEnd);
        if (pos !== ci * cs || to !== clusterEnd) {
          addPlain(pos, to);
          pos = to;
          continue;
        }
        const l1i = Math.floor(ci / g.l2Entries);
        const table = await this.tables.forWrite(l1i);
        pinned.push(table);
        const entry = (ci - l1i * g.l2Entries) * g.l2EntrySize;
        if (!this.isEmpty(table, entry)) {
          addPlain(pos, to);
        } else {
          let cluster = data.subarray(pos - offset, to - offset);
          const readsAsZero = st.backing === null || ci * cs >= st.backing.size;
          if (cluster.length < cs) cluster = Buffer.concat([cluster, Buffer.alloc(cs - cluster.length)]);
          // Zeroes over nothing stay unallocated, as `qemu-img convert -c` leaves them.
          if (!(readsAsZero && isZero(cluster))) candidates.push({ table, entry, ci, data: cluster, stream: null, host: 0 });
        }
        pos = to;
      }
      await Promise.all(
        candidates.map(async (c) => {
          c.stream = await compressCluster(st.header.compressionType, c.data, cs - MIN_SAVING);
        }),
      );
      const packed = candidates.filter((c) => c.stream !== null);
      for (const c of candidates) if (!c.stream) addPlain(c.ci * cs, Math.min((c.ci + 1) * cs, st.size));
      plain.sort((x, y) => x[0] - y[0]);
      // The ordinary writes and the streams touch disjoint guest clusters: they may overlap in time.
      const plainDone = Promise.all(plain.map(([from, to]) => this.writer.writeLocked(from, data.subarray(from - offset, to - offset), w)));
      const packDone = packed.length > 0 ? this.pack(packed, w) : Promise.resolve();
      const [a, b] = await Promise.allSettled([plainDone, packDone]);
      if (a.status === 'rejected') throw a.reason;
      if (b.status === 'rejected') throw b.reason;
    } finally {
      for (const t of pinned) this.tables.release(t);
    }
  }

  /** Gives the tail's hold back (close does, before its last commit). */
  release(): void {
    if (this.tail) this.st.pendingFrees.push(this.tail.cluster);
    this.tail = null;
  }

  /** An entry that maps nothing (no host cluster, no flags, no subcluster bits): a stream may take it. */
  private isEmpty(table: L2Table, entry: number): boolean {
    const d = table.data;
    if (d.readUInt32BE(entry) !== 0 || d.readUInt32BE(entry + 4) !== 0) return false;
    return !this.st.g.extendedL2 || (d.readUInt32BE(entry + L2_ZERO_BITS) === 0 && d.readUInt32BE(entry + L2_ALLOC_BITS) === 0);
  }

  private async pack(packed: Candidate[], w: EntryWrites): Promise<void> {
    const { st } = this;
    // Each stream is shorter than a cluster, so it takes at most one new host cluster.
    while (this.alloc.available < packed.length) await this.alloc.reserve(packed.length);
    for (const c of packed) c.host = this.place(c.stream!.length); // synchronous: no other request interleaves
    const writes: Promise<void>[] = [];
    for (let i = 0; i < packed.length; ) {
      let j = i + 1;
      while (j < packed.length && packed[j]!.host === packed[j - 1]!.host + packed[j - 1]!.stream!.length) j++;
      for (const c of packed.slice(i, j)) {
        const first = Math.floor(c.host / st.cs);
        const last = Math.floor((c.host + c.stream!.length - 1) / st.cs);
        for (let k = first; k <= last; k++) if (st.isMetadata(k)) throw st.overlap(k, `a compressed write of guest offset 0x${(c.ci * st.cs).toString(16)}`);
      }
      const bufs = packed.slice(i, j).map((c) => c.stream!);
      writes.push(bufs.length === 1 ? st.port.writeAt(bufs[0]!, packed[i]!.host) : st.port.writevAt(bufs, packed[i]!.host));
      i = j;
    }
    await Promise.all(writes);
    st.unsyncedData = true;
    await this.committer.commit(); // the counts the streams added
    await this.writer.syncData(); // ...and the streams, durable before any entry names them
    for (const c of packed) {
      encodeCompressed(c.table.data, c.entry, c.host, c.stream!.length, st.g.clusterBits);
      w.touch(c.table, c.entry);
    }
  }

  /**
   * Where a stream of `length` (< cluster size) bytes goes, counting it in every host cluster it
   * touches: right after the previous stream, running on into the next host cluster when the pool
   * hands out the adjacent one; else at the start of a fresh cluster. The caller made sure the
   * pool holds a cluster.
   */
  private place(length: number): number {
    const { st } = this;
    const refs = st.refs!;
    const cs = st.cs;
    const tail = this.tail;
    if (tail && tail.used < cs && refs.get(tail.cluster) < refs.max) {
      const at = tail.cluster * cs + tail.used;
      if (tail.used + length <= cs) {
        refs.increment(tail.cluster);
        tail.used += length;
        return at;
      }
      const next = this.takeCluster();
      if (next === tail.cluster + 1 && refs.get(next) < refs.max) {
        refs.increment(tail.cluster);
        refs.increment(next);
        this.hold(next, tail.used + length - cs);
        return at;
      }
      refs.increment(next);
      this.hold(next, length);
      return next * cs;
    }
    const next = this.takeCluster();
    refs.increment(next);
    this.hold(next, length);
    return next * cs;
  }

  /** A cluster from the pool: its count of 1 is the tail's hold. */
  private takeCluster(): number {
    const c = this.alloc.take(1).offset / this.st.cs;
    this.alloc.unpunch(c);
    return c;
  }

  /** `cluster` becomes the tail, with `used` bytes taken; the old tail's hold goes. */
  private hold(cluster: number, used: number): void {
    this.release();
    this.tail = { cluster, used };
  }
}
