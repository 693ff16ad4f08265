/**
 * The copy at the heart of a backup: ranges of an NBD export (the point-in-time view, or a remote
 * export) into a new qcow2 point, split by the export's base:allocation into data (read, summed,
 * written) and zeroes (written as zero clusters in an incremental, so they hide the older data
 * below; skipped in a full point, which starts all zero). Also the disk checksums of a point.
 */
import type { Backend } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import type { StatusExtent } from '../core/meta-context.js';
import type { NbdBackend } from '../backends/nbd.js';
import { BASE_ALLOCATION } from '../nbd/wire/contexts.js';
import { NBD_STATE_ZERO } from '../nbd/wire/constants.js';
import { CHUNK_SIZE, type StoredExtent } from './repo.js';
import { BLOCK_SIZE, BLOCKS_PER_CHUNK, blockSum, blockSumsOf, chunkSum, rangeSum, zeroBlockSum, type BlockSums } from './sums.js';

/** Most bytes one read asks for; pieces never cross a CHUNK_SIZE boundary either. */
const PIECE = 4 * 1024 * 1024;
/**
 * Pieces in flight at once, within BYTES_IN_FLIGHT of data: eight whole pieces, or many small
 * ones (a scattered incremental is a stream of 64 KiB pieces, each a read, a write and a TRIM
 * round trip, which only parallelism hides).
 */
const PARALLEL = 32;
const BYTES_IN_FLIGHT = 8 * PIECE;

export type Range = [offset: number, length: number];

/** Every extent of `context` over [offset, offset + length), in order. */
export async function walkStatus(source: NbdBackend, context: string, offset: number, length: number, emit: (e: StatusExtent, at: number) => void): Promise<void> {
  const end = offset + length;
  let at = offset;
  while (at < end) {
    const byContext = await source.client.blockStatus(at, end - at);
    const extents = byContext.get(context);
    if (!extents || extents.length === 0) throw new NbddError(Errno.EPROTO, `the NBD server sent no ${context} extents at ${at}`);
    for (const e of extents) {
      const n = Math.min(e.length, end - at);
      if (n <= 0) break;
      emit({ length: n, flags: e.flags }, at);
      at += n;
    }
  }
}

/** The ranges `context` (a qemu:dirty-bitmap) marks dirty, merged. */
export async function dirtyRanges(source: NbdBackend, context: string): Promise<Range[]> {
  const out: Range[] = [];
  await walkStatus(source, context, 0, source.size, (e, at) => {
    if ((e.flags & 1) === 0) return;
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === at) last[1] += e.length;
    else out.push([at, e.length]);
  });
  return out;
}

/** A new point's image: a Backend that can also store compressed clusters (Qcow2Image). */
export interface PointTarget extends Backend {
  writeCompressed(offset: number, data: Buffer): Promise<void>;
}

export interface CopyProgress {
  (bytesDone: number): void;
}

export interface CopyResult {
  extents: StoredExtent[];
  /** Sums of the blocks wholly inside what was copied (data or zeroes), by block index. */
  blocks: Map<number, Buffer>;
  bytesRead: number;
  bytesStored: number;
  zeroBytes: number;
}

/** `ranges` cut where base:allocation changes between data and zeroes, and at CHUNK_SIZE / PIECE bounds. */
async function plan(source: NbdBackend, ranges: Range[]): Promise<Piece[]> {
  const pieces: Piece[] = [];
  const add = (offset: number, length: number, zero: boolean): void => {
    for (let at = offset; at < offset + length; ) {
      const n = Math.min(offset + length - at, PIECE, CHUNK_SIZE - (at % CHUNK_SIZE));
      pieces.push({ offset: at, length: n, zero });
      at += n;
    }
  };
  if (!source.client.info.contexts.has(BASE_ALLOCATION)) {
    for (const [o, l] of ranges) add(o, l, false);
    return pieces;
  }
  // One walk of the (unchanging) view's allocation over the span of all ranges, then intersected.
  const allocation: { offset: number; length: number; zero: boolean }[] = [];
  if (ranges.length > 0) {
    const first = ranges[0]![0];
    const last = ranges[ranges.length - 1]!;
    await walkStatus(source, BASE_ALLOCATION, first, last[0] + last[1] - first, (e, at) => {
      const zero = (e.flags & NBD_STATE_ZERO) !== 0;
      const prev = allocation[allocation.length - 1];
      if (prev && prev.zero === zero && prev.offset + prev.length === at) prev.length += e.length;
      else allocation.push({ offset: at, length: e.length, zero });
    });
  }
  let ai = 0;
  for (const [o, l] of ranges) {
    let at = o;
    while (at < o + l) {
      while (ai < allocation.length && allocation[ai]!.offset + allocation[ai]!.length <= at) ai++;
      const a = allocation[ai];
      if (!a) throw new NbddError(Errno.EPROTO, `the NBD server's base:allocation does not cover offset ${at}`);
      const n = Math.min(o + l, a.offset + a.length) - at;
      add(at, n, a.zero);
      at += n;
    }
  }
  return pieces;
}

interface Piece {
  offset: number;
  length: number;
  zero: boolean;
}

/**
 * Copies `ranges` of `source` into `target`, PARALLEL pieces (and BYTES_IN_FLIGHT) at a time over all ranges.
 * `incremental`: zero ranges are written as zeroes (the target has a backing file); else they are
 * left alone. `compress`: data goes in as compressed clusters where it compresses. `release` runs for every piece once it is in the target (the backup TRIMs the view).
 */
export async function copyRanges(
  source: NbdBackend,
  target: PointTarget,
  ranges: Range[],
  options: { incremental: boolean; compress?: boolean; progress?: CopyProgress; release?: (r: Range) => Promise<void> },
): Promise<CopyResult> {
  const result: CopyResult = { extents: [], blocks: new Map(), bytesRead: 0, bytesStored: 0, zeroBytes: 0 };
  const pieces = await plan(source, ranges);
  /**
   * Records the sums of the whole blocks inside [offset, offset + length): `sumOf(start, n)` is
   * the sum of the n bytes at disk offset `start`.
   */
  const noteBlocks = (offset: number, length: number, sumOf: (start: number, n: number) => Buffer): void => {
    const end = offset + length;
    for (let b = Math.ceil(offset / BLOCK_SIZE); b * BLOCK_SIZE < end; b++) {
      const start = b * BLOCK_SIZE;
      const n = Math.min(BLOCK_SIZE, source.size - start);
      if (start + n > end) break;
      result.blocks.set(b, sumOf(start, n));
    }
  };
  const stored: (StoredExtent | null)[] = new Array(pieces.length).fill(null);
  let done = 0;
  let next = 0;
  let inFlight = 0;
  const waiting: (() => void)[] = [];
  const worker = async (): Promise<void> => {
    while (next < pieces.length) {
      const i = next++;
      const p = pieces[i]!;
      const bytes = p.zero ? 0 : p.length;
      while (inFlight > 0 && inFlight + bytes > BYTES_IN_FLIGHT) await new Promise<void>((resolve) => waiting.push(resolve));
      inFlight += bytes;
      try {
        await copyPiece(i, p);
      } finally {
        inFlight -= bytes;
        for (const wake of waiting.splice(0)) wake();
      }
      done += p.length;
      options.progress?.(done);
    }
  };
  const copyPiece = async (i: number, p: Piece): Promise<void> => {
    if (p.zero) {
      result.zeroBytes += p.length;
      noteBlocks(p.offset, p.length, (_, n) => zeroBlockSum(n));
      if (options.incremental) {
        await target.writeZeroes!(p.offset, p.length);
        stored[i] = [p.offset, p.length, null]; // a full point stores nothing for zeroes
      }
    } else {
      const data = await source.read(p.offset, p.length);
      result.bytesRead += data.length;
      const written = options.compress ? target.writeCompressed(p.offset, data) : target.write(p.offset, data);
      // Hashed while the write runs. A block-aligned piece's slices are its blocks: one pass.
      const slices = blockSumsOf(data);
      stored[i] = [p.offset, p.length, rangeSum(slices)];
      const aligned = p.offset % BLOCK_SIZE === 0;
      noteBlocks(p.offset, p.length, (start, n) => (aligned ? slices[(start - p.offset) / BLOCK_SIZE]! : blockSum(data.subarray(start - p.offset, start - p.offset + n))));
      await written;
      result.bytesStored += data.length;
    }
    await options.release?.([p.offset, p.length]);
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, pieces.length) }, worker));
  result.extents = stored.filter((e): e is StoredExtent => e !== null);
  return result;
}

/**
 * What an incremental point's sums start from: the point below's chunk sums, its disk's block
 * sums (repo.ts `blockSumsAt`; null when they are not on record), and what this point changed.
 */
export interface SumsBase {
  chunks: string[];
  blocks: BlockSums | null;
  /** Chunks this point's stored extents overlap; the others are carried over. */
  touched: Set<number>;
  /** Blocks this point's stored extents overlap; the others of a touched chunk are as below. */
  changed: Set<number>;
}

export interface ChunkSumsResult {
  chunks: string[];
  /** The block sums taken from `known` or read (not those carried over), by block index. */
  computed: Map<number, Buffer>;
}

/**
 * The sum of every CHUNK_SIZE chunk of `disk` (sums.ts). With `base` only the touched chunks are
 * computed, the rest carried over, and in those only the changed blocks are needed: the others'
 * sums come from `base.blocks` (so scattered small changes cost no re-reading). Block sums come
 * from `known` (what the copy hashed) where it has them; other blocks are read from `disk` unless
 * it reports them zero.
 */
export async function chunkSums(disk: Backend, known: Map<number, Buffer>, base: SumsBase | null): Promise<ChunkSumsResult> {
  const count = Math.ceil(disk.size / CHUNK_SIZE);
  const sums: string[] = new Array(count);
  const computed = new Map<number, Buffer>();
  const todo: number[] = [];
  for (let i = 0; i < count; i++) {
    if (base && !base.touched.has(i)) sums[i] = base.chunks[i]!;
    else todo.push(i);
  }
  const totalBlocks = Math.ceil(disk.size / BLOCK_SIZE);
  const blockLength = (b: number): number => Math.min(BLOCK_SIZE, disk.size - b * BLOCK_SIZE);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < todo.length) {
      const i = todo[next++]!;
      const first = i * BLOCKS_PER_CHUNK;
      const last = Math.min(first + BLOCKS_PER_CHUNK, totalBlocks);
      const blocks = new Array<Buffer | undefined>(last - first).fill(undefined);
      for (let b = first; b < last; b++) {
        const k = known.get(b);
        if (k) {
          blocks[b - first] = k;
          computed.set(b, k);
        } else if (base?.blocks && !base.changed.has(b)) {
          blocks[b - first] = base.blocks.get(b) ?? zeroBlockSum(blockLength(b));
        }
      }
      if (blocks.some((x) => !x)) {
        // One status call and at most one read for the chunk's blocks not known otherwise.
        const offset = first * BLOCK_SIZE;
        const length = Math.min(CHUNK_SIZE, disk.size - offset);
        const zero = new Array<boolean>(last - first).fill(false);
        if (disk.blockStatus) {
          let at = offset;
          for (const e of await disk.blockStatus(offset, length)) {
            for (let k = 0; e.zero && k < zero.length; k++) {
              const start = offset + k * BLOCK_SIZE;
              if (start >= at && Math.min(start + BLOCK_SIZE, disk.size) <= at + e.length) zero[k] = true;
            }
            at += e.length;
          }
        }
        let data: Buffer | null = null;
        for (let k = 0; k < last - first; k++) {
          if (blocks[k]) continue;
          const n = blockLength(first + k);
          if (zero[k]) blocks[k] = zeroBlockSum(n);
          else {
            data ??= await disk.read(offset, length);
            blocks[k] = blockSum(data.subarray(k * BLOCK_SIZE, k * BLOCK_SIZE + n));
          }
          computed.set(first + k, blocks[k]!);
        }
      }
      sums[i] = chunkSum(blocks as Buffer[]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(4, todo.length) }, worker));
  return { chunks: sums, computed };
}

/** The blocks the stored extents overlap. */
export function changedBlocks(extents: StoredExtent[]): Set<number> {
  const out = new Set<number>();
  for (const [offset, length] of extents) for (let b = Math.floor(offset / BLOCK_SIZE); b * BLOCK_SIZE < offset + length; b++) out.add(b);
  return out;
}

/** The chunks the stored extents overlap. */
export function touchedChunks(extents: StoredExtent[]): Set<number> {
  const out = new Set<number>();
  for (const [offset, length] of extents) for (let c = Math.floor(offset / CHUNK_SIZE); c * CHUNK_SIZE < offset + length; c++) out.add(c);
  return out;
}
