/**
 * A sparse in-memory backend, for tests and scratch disks (see memory.md).
 *
 * The virtual disk is cut into 64 KiB chunks held in a Map; an absent chunk is a hole that reads as
 * zeroes. Writes allocate the chunks they touch; TRIM and WRITE_ZEROES (without NO_HOLE) free the
 * chunks they cover completely and zero the covered part of the others; WRITE_ZEROES with NO_HOLE
 * keeps (or allocates) the chunks and fills them with zeroes. Block status is exact at chunk
 * granularity for holes, and byte-exact for "reads as zero" within the queried range.
 *
 * Nothing is volatile, so flush and FUA are free. Memory is bounded by what is written, not by
 * `size`; nothing limits that except the host.
 */
import { assertRange, defaultCaps, type Backend, type BackendCaps, type Extent, type ZeroOptions } from '../core/backend.js';
import { Errno, NbddError, assert } from '../core/errors.js';

/** Allocation unit. Extents in block status start and end on multiples of it (or at the range ends). */
export const MEMORY_CHUNK_SIZE = 64 * 1024;

const ZERO_CHUNK = Buffer.alloc(MEMORY_CHUNK_SIZE);

export interface MemoryBackendOptions {
  /** Virtual size in bytes: a safe integer > 0. */
  size: number;
  readOnly?: boolean;
}

/** One chunk's share of a request: `start`/`length` within the chunk, `pos` within the request. */
type ChunkVisitor = (index: number, start: number, length: number, pos: number) => void;

export class MemoryBackend implements Backend {
  readonly kind = 'memory';
  readonly size: number;
  readonly caps: BackendCaps;
  private readonly chunks = new Map<number, Buffer>();

  /** Throws EINVAL when `size` is not a safe integer > 0. */
  constructor(options: MemoryBackendOptions) {
    if (!Number.isSafeInteger(options.size) || options.size <= 0) {
      throw new NbddError(Errno.EINVAL, `memory backend size ${options.size} must be a whole number of bytes > 0`);
    }
    this.size = options.size;
    this.caps = defaultCaps({
      readOnly: !!options.readOnly,
      flush: true,
      fua: true,
      trim: true,
      writeZeroes: true,
      fastZero: true,
      blockStatus: true,
    });
  }

  /** Bytes held in allocated chunks (for tests and statistics). */
  get allocatedBytes(): number {
    let total = 0;
    for (const chunk of this.chunks.values()) total += chunk.length;
    return total;
  }

  /** Returns a new buffer owned by the caller. */
  async read(offset: number, length: number): Promise<Buffer> {
    assertRange(this.size, offset, length);
    const out = Buffer.allocUnsafe(length);
    this.visit(offset, length, (index, start, n, pos) => {
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(out, pos, start, start + n);
      else out.fill(0, pos, pos + n);
    });
    return out;
  }

  /** Copies `data` before returning; the caller keeps its buffer. */
  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    this.visit(offset, data.length, (index, start, n, pos) => {
      data.copy(this.allocate(index), start, pos, pos + n);
    });
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
    this.deallocate(offset, length);
  }

  /** Always fast: `fastZero` never fails. */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.assertWritable(offset, length);
    if (!options.noHole) {
      this.deallocate(offset, length);
      return;
    }
    this.visit(offset, length, (index, start, n) => {
      this.allocate(index).fill(0, start, start + n);
    });
  }

  /**
   * One extent per run of chunks in the same state, clipped to `[offset, offset + length)`:
   * absent chunks are holes reading as zero (depth 0); allocated ones are data (depth 1), flagged
   * zero when the queried part of the chunk is all zero bytes.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    assertRange(this.size, offset, length);
    const extents: Extent[] = [];
    this.visit(offset, length, (index, start, n) => {
      const chunk = this.chunks.get(index);
      const hole = !chunk;
      const zero = hole || chunk.subarray(start, start + n).equals(ZERO_CHUNK.subarray(0, n));
      const last = extents[extents.length - 1];
      if (last && last.hole === hole && last.zero === zero) last.length += n;
      else extents.push({ length: n, hole, zero, depth: hole ? 0 : 1 });
    });
    return extents;
  }

  /** Drops all data. Idempotent. */
  async close(): Promise<void> {
    this.chunks.clear();
  }

  /* ------------------------------------------------------------ chunks */

  private visit(offset: number, length: number, visitor: ChunkVisitor): void {
    const end = offset + length;
    for (let at = offset; at < end; ) {
      const index = Math.floor(at / MEMORY_CHUNK_SIZE);
      const start = at - index * MEMORY_CHUNK_SIZE;
      const n = Math.min(MEMORY_CHUNK_SIZE - start, end - at);
      visitor(index, start, n, at - offset);
      at += n;
    }
  }

  /** Length of chunk `index`: the last one may be short. */
  private chunkLength(index: number): number {
    return Math.min(MEMORY_CHUNK_SIZE, this.size - index * MEMORY_CHUNK_SIZE);
  }

  /** The chunk, allocated (zero-filled) if absent. */
  private allocate(index: number): Buffer {
    let chunk = this.chunks.get(index);
    if (!chunk) {
      chunk = Buffer.alloc(this.chunkLength(index));
      this.chunks.set(index, chunk);
    }
    return chunk;
  }

  /** Frees chunks the range covers completely; zeroes the covered part of the others. */
  private deallocate(offset: number, length: number): void {
    this.visit(offset, length, (index, start, n) => {
      if (n === this.chunkLength(index)) this.chunks.delete(index);
      else this.chunks.get(index)?.fill(0, start, start + n);
    });
  }

  private assertWritable(offset: number, length: number): void {
    assert(!this.caps.readOnly, 'write-type request sent to a read-only memory backend');
    assertRange(this.size, offset, length);
  }
}
