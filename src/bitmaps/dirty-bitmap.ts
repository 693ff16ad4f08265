/**
 * An in-memory dirty bitmap: one bit per granule of a disk, as qcow2 and QEMU keep them.
 *
 * Layout (the same bytes qcow2 stores in bitmap data clusters, so (de)serializing is a copy):
 *
 *   byte j, bit i (value 1 << i)  ⇔  granule 8*j + i  ⇔  disk bytes [(8j+i)*g, (8j+i+1)*g)
 *
 * i.e. LSB-first. The last granule may be partial (it covers the tail of the disk); bits past the
 * last granule are always zero. Range operations work on whole bytes (`fill`) and skip 32-bit words
 * that are all zero or all one, so marking or scanning a large range never loops per bit.
 *
 * Granule runs are reported as `GranuleRun {first, count}`; byte ranges as offset/length.
 * Offsets and lengths are asserted, not validated: callers (the layers, the control server) have
 * checked them against the disk size already.
 */
import { Errno, NbddError, assert } from '../core/errors.js';

/** A run of consecutive granules. */
export interface GranuleRun {
  first: number;
  count: number;
}

/** A byte range with one state, as `extents()` yields it. */
export interface BitmapExtent {
  offset: number;
  length: number;
  dirty: boolean;
}

/** Granularity bounds: qcow2 allows 2^9 .. 2^31 bytes (QEMU's BME_{MIN,MAX}_GRANULARITY_BITS). */
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const DEFAULT_GRANULARITY = 64 * 1024;
/**
 * What a persistent bitmap keeps wherever it is stored — a qcow2 image or nbdd's sidecar file —
 * so one moves between them unchanged: QEMU's limits (BME_MAX_NAME_SIZE, QCOW2_MAX_BITMAPS,
 * BME_MAX_PHYS_SIZE for the serialized bits of one bitmap).
 */
export const BITMAP_LIMITS = { maxNameBytes: 1023, maxBitmaps: 65535, maxDataBytes: 512 * 1024 * 1024 } as const;

/** Throws EINVAL unless `g` is a power of two in the qcow2 range; returns log2(g). */
export function granularityBits(g: number): number {
  const bits = Math.log2(g);
  if (!Number.isInteger(bits) || bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
    throw new NbddError(
      Errno.EINVAL,
      `granularity ${g} is not a power of two between ${2 ** MIN_GRANULARITY_BITS} and ${2 ** MAX_GRANULARITY_BITS}`,
    );
  }
  return bits;
}

/** Popcount of every byte value. */
const POPCOUNT = new Uint8Array(256).map((_, v) => {
  let n = 0;
  for (let x = v; x; x >>= 1) n += x & 1;
  return n;
});

export class DirtyBitmap {
  /** Disk size in bytes the bitmap covers. */
  readonly size: number;
  /** Bytes per bit (a power of two). */
  readonly granularity: number;
  readonly granularityBits: number;
  /** Number of granules, `ceil(size / granularity)`. */
  readonly granules: number;
  /** `ceil(granules / 8)`: the serialized length. */
  readonly byteLength: number;
  private readonly bytes: Uint8Array;
  /** The same memory as 32-bit words, only ever compared with 0 and ~0 (endian-neutral). */
  private readonly words: Uint32Array;

  /** The bytes a bitmap of `size` at `granularity` takes (what the constructor allocates). */
  static bytesFor(size: number, granularity: number): number {
    return Math.ceil(Math.ceil(size / granularity) / 8);
  }

  constructor(size: number, granularity: number) {
    assert(Number.isSafeInteger(size) && size >= 0, 'bitmap size is a non-negative integer');
    this.size = size;
    this.granularity = granularity;
    this.granularityBits = granularityBits(granularity);
    this.granules = Math.ceil(size / granularity);
    this.byteLength = Math.ceil(this.granules / 8);
    const buffer = new ArrayBuffer(Math.ceil(this.byteLength / 4) * 4);
    this.bytes = new Uint8Array(buffer);
    this.words = new Uint32Array(buffer);
  }

  /* ------------------------------------------------------------ granule level */

  /** Whether granule `i` is dirty. */
  get(i: number): boolean {
    return (this.bytes[i >>> 3]! & (1 << (i & 7))) !== 0;
  }

  /** Sets (`value` true) or clears granules `[first, first+count)`. */
  fill(first: number, count: number, value: boolean): void {
    assert(first >= 0 && count >= 0 && first + count <= this.granules, 'granule run inside the bitmap');
    if (count === 0) return;
    const end = first + count;
    const b0 = first >>> 3;
    const b1 = (end - 1) >>> 3;
    const headMask = (0xff << (first & 7)) & 0xff;
    const tailMask = 0xff >>> (7 - ((end - 1) & 7));
    const bytes = this.bytes;
    if (b0 === b1) {
      const m = headMask & tailMask;
      bytes[b0] = value ? bytes[b0]! | m : bytes[b0]! & ~m;
      return;
    }
    bytes[b0] = value ? bytes[b0]! | headMask : bytes[b0]! & ~headMask;
    bytes[b1] = value ? bytes[b1]! | tailMask : bytes[b1]! & ~tailMask;
    if (b1 > b0 + 1) bytes.fill(value ? 0xff : 0, b0 + 1, b1);
  }

  /** First granule in `[from, end)` whose bit equals `value`, or `end` if none. */
  find(from: number, end: number, value: boolean): number {
    const bytes = this.bytes;
    const skip = value ? 0 : 0xff; // a byte with nothing to find
    const skipWord = value ? 0 : 0xffffffff;
    let i = from;
    while (i < end) {
      const bi = i >>> 3;
      if ((i & 7) === 0 && (bi & 3) === 0 && i + 32 <= end && this.words[bi >>> 2] === skipWord) {
        i += 32;
        continue;
      }
      const b = bytes[bi]!;
      if ((i & 7) === 0 && b === skip) {
        i += 8;
        continue;
      }
      if (((b >>> (i & 7)) & 1) === (value ? 1 : 0)) return i;
      i++;
    }
    return end;
  }

  /** Number of dirty granules. */
  count(): number {
    let n = 0;
    for (let w = 0; w < this.words.length; w++) {
      if (this.words[w] === 0) continue;
      const base = w * 4;
      n += POPCOUNT[this.bytes[base]!]! + POPCOUNT[this.bytes[base + 1]!]! + POPCOUNT[this.bytes[base + 2]!]! + POPCOUNT[this.bytes[base + 3]!]!;
    }
    return n;
  }

  /** The granules `[first, first+count)` covering bytes `[offset, offset+length)`. */
  granulesOf(offset: number, length: number): GranuleRun {
    assert(offset >= 0 && length > 0 && offset + length <= this.size, 'byte range inside the disk');
    const first = Math.floor(offset / this.granularity);
    const end = Math.ceil((offset + length) / this.granularity);
    return { first, count: end - first };
  }

  /* ------------------------------------------------------------ byte level */

  /** Marks the granules touching `[offset, offset+length)` dirty. */
  setRange(offset: number, length: number): void {
    const { first, count } = this.granulesOf(offset, length);
    this.fill(first, count, true);
  }

  /**
   * Marks the granules touching `[offset, offset+length)` dirty and appends to `out` the runs that
   * were clean before (what a write-intent store must persist). Returns the number of granules
   * newly set. Costs one scan when everything is already dirty (the steady state).
   */
  markRange(offset: number, length: number, out: GranuleRun[]): number {
    assert(offset >= 0 && length > 0 && offset + length <= this.size, 'byte range inside the disk');
    const first = Math.floor(offset / this.granularity);
    const end = Math.ceil((offset + length) / this.granularity);
    let added = 0;
    for (let c = this.find(first, end, false); c < end; ) {
      const s = this.find(c, end, true);
      this.fill(c, s - c, true);
      out.push({ first: c, count: s - c });
      added += s - c;
      c = s < end ? this.find(s, end, false) : end;
    }
    return added;
  }

  /** Clears every bit. */
  clear(): void {
    this.bytes.fill(0);
  }

  /** Whether every granule touching `[offset, offset+length)` is dirty. */
  allDirty(offset: number, length: number): boolean {
    const { first, count } = this.granulesOf(offset, length);
    return this.find(first, first + count, false) === first + count;
  }

  /** Whether any granule touching `[offset, offset+length)` is dirty. */
  anyDirty(offset: number, length: number): boolean {
    const { first, count } = this.granulesOf(offset, length);
    return this.find(first, first + count, true) < first + count;
  }

  /**
   * Runs of equal state covering `[offset, min(offset+length, size))`, the first starting at
   * `offset` (not necessarily granule-aligned), at most `maxExtents` of them (the last one then
   * ends early: callers ask again from where it stopped).
   */
  extents(offset: number, length: number, maxExtents = Number.MAX_SAFE_INTEGER): BitmapExtent[] {
    const stop = Math.min(offset + length, this.size);
    assert(offset >= 0 && offset < stop, 'extent query inside the disk');
    const g = this.granularity;
    const endGranule = Math.ceil(stop / g);
    const out: BitmapExtent[] = [];
    let at = offset;
    let i = Math.floor(offset / g);
    while (at < stop && out.length < maxExtents) {
      const dirty = this.get(i);
      const next = this.find(i + 1, endGranule, !dirty);
      const end = Math.min(next * g, stop);
      out.push({ offset: at, length: end - at, dirty });
      at = end;
      i = next;
    }
    return out;
  }

  /* ------------------------------------------------------------ whole bitmap */

  /**
   * `this |= other`. Both cover the same disk size; granularities may differ (a coarser target
   * marks every granule a dirty source granule touches).
   */
  merge(other: DirtyBitmap): void {
    if (other.size !== this.size) {
      throw new NbddError(Errno.EINVAL, `cannot merge a bitmap of a ${other.size}-byte disk into one of ${this.size} bytes`);
    }
    if (other.granularity === this.granularity) {
      for (let w = 0; w < this.words.length; w++) this.words[w]! |= other.words[w]!;
      return;
    }
    for (let i = other.find(0, other.granules, true); i < other.granules; ) {
      const end = other.find(i, other.granules, false);
      const offset = i * other.granularity;
      this.setRange(offset, Math.min(end * other.granularity, this.size) - offset);
      i = end < other.granules ? other.find(end, other.granules, true) : end;
    }
  }

  /** An independent copy. */
  copy(): DirtyBitmap {
    const c = new DirtyBitmap(this.size, this.granularity);
    c.bytes.set(this.bytes);
    return c;
  }

  /**
   * The serialized bits, `byteLength` bytes, LSB-first. A view of the bitmap's own memory: valid
   * until the bitmap changes; copy it to keep it.
   */
  view(first = 0, end = this.byteLength): Uint8Array {
    return this.bytes.subarray(first, end);
  }

  /** Replaces the bits with serialized `data` (`byteLength` bytes; stray tail bits are dropped). */
  load(data: Uint8Array, atByte = 0): void {
    assert(atByte + data.length <= this.byteLength, 'serialized bits fit the bitmap');
    this.bytes.set(data, atByte);
    const tail = this.granules & 7;
    if (tail && atByte + data.length === this.byteLength) this.bytes[this.byteLength - 1]! &= (1 << tail) - 1;
  }

  /** The byte range `[first, end)` of the serialized form holding granules of `run`. */
  static bytesOf(run: GranuleRun): { first: number; end: number } {
    return { first: run.first >>> 3, end: ((run.first + run.count - 1) >>> 3) + 1 };
  }
}
