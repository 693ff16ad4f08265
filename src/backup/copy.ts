/**
 * The copy at the heart of a backup: ranges of an NBD export (the point-in-time view, or a remote
 * export) into a new qcow2 point, split by the export's base:allocation into data (read, summed,
 * written) and zeroes (written as zero clusters in an incremental, so they hide the older data
 * below; skipped in a full point, which starts all zero). Also the disk checksums of a point.
 */
import { createHash } from 'node:crypto';
import type { Backend } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import type { StatusExtent } from '../core/meta-context.js';
import type { NbdBackend } from '../backends/nbd.js';
import { BASE_ALLOCATION } from '../nbd/wire/contexts.js';
import { NBD_STATE_ZERO } from '../nbd/wire/constants.js';
import { CHUNK_SIZE, type StoredExtent } from './repo.js';

/** Most bytes one read asks for; pieces never cross a CHUNK_SIZE boundary either. */
const PIECE = 4 * 1024 * 1024;
/** Pieces in flight at once. */
const PARALLEL = 8;

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

export interface CopyProgress {
  (bytesDone: number): void;
}

export interface CopyResult {
  extents: StoredExtent[];
  bytesRead: number;
  bytesStored: number;
  zeroBytes: number;
}

/**
 * Copies `ranges` of `source` into `target`. `incremental`: zero ranges are written as zeroes
 * (the target has a backing file); else they are left alone. `afterRange` runs once a range is
 * in the target (the backup releases it on the view).
 */
export async function copyRanges(
  source: NbdBackend,
  target: Backend,
  ranges: Range[],
  options: { incremental: boolean; progress?: CopyProgress; afterRange?: (r: Range) => Promise<void> },
): Promise<CopyResult> {
  const result: CopyResult = { extents: [], bytesRead: 0, bytesStored: 0, zeroBytes: 0 };
  const hasStatus = source.client.info.contexts.has(BASE_ALLOCATION);
  let done = 0;
  for (const range of ranges) {
    const pieces: { offset: number; length: number; zero: boolean }[] = [];
    const add = (offset: number, length: number, zero: boolean): void => {
      for (let at = offset; at < offset + length; ) {
        const n = Math.min(offset + length - at, PIECE, CHUNK_SIZE - (at % CHUNK_SIZE));
        pieces.push({ offset: at, length: n, zero });
        at += n;
      }
    };
    if (hasStatus) await walkStatus(source, BASE_ALLOCATION, range[0], range[1], (e, at) => add(at, e.length, (e.flags & NBD_STATE_ZERO) !== 0));
    else add(range[0], range[1], false);

    const stored: StoredExtent[] = new Array(pieces.length);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < pieces.length) {
        const i = next++;
        const p = pieces[i]!;
        if (p.zero) {
          if (options.incremental) await target.writeZeroes!(p.offset, p.length);
          stored[i] = [p.offset, p.length, null];
          result.zeroBytes += p.length;
        } else {
          const data = await source.read(p.offset, p.length);
          result.bytesRead += data.length;
          await target.write(p.offset, data);
          result.bytesStored += data.length;
          stored[i] = [p.offset, p.length, createHash('sha256').update(data).digest('hex')];
        }
        done += p.length;
        options.progress?.(done);
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, pieces.length) }, worker));
    // In a full point the zero ranges are not stored at all: record only what an incremental wrote.
    result.extents.push(...stored.filter((e) => e[2] !== null || options.incremental));
    await options.afterRange?.(range);
  }
  return result;
}

const zeroChunkSums = new Map<number, string>();
function zeroSum(length: number): string {
  let s = zeroChunkSums.get(length);
  if (!s) zeroChunkSums.set(length, (s = createHash('sha256').update(Buffer.alloc(length)).digest('hex')));
  return s;
}

/**
 * The SHA-256 of every CHUNK_SIZE chunk of `disk` (the last one shorter), re-reading only the
 * chunks in `touched` when `previous` holds the sums of the point below (else every chunk).
 * Chunks the image reports all zero are not read.
 */
export async function chunkSums(disk: Backend, previous: string[] | null, touched: Set<number> | null): Promise<string[]> {
  const count = Math.ceil(disk.size / CHUNK_SIZE);
  const sums: string[] = new Array(count);
  for (let i = 0; i < count; i++) {
    if (previous && touched && !touched.has(i)) {
      sums[i] = previous[i]!;
      continue;
    }
    const offset = i * CHUNK_SIZE;
    const length = Math.min(CHUNK_SIZE, disk.size - offset);
    const status = disk.blockStatus ? await disk.blockStatus(offset, length) : [];
    if (status.length === 1 && status[0]!.zero && status[0]!.length >= length) {
      sums[i] = zeroSum(length);
      continue;
    }
    sums[i] = createHash('sha256').update(await disk.read(offset, length)).digest('hex');
  }
  return sums;
}

/** The disk's checksum: SHA-256 over its chunk sums (as bytes, in order). */
export function diskSum(chunks: string[]): string {
  const h = createHash('sha256');
  for (const c of chunks) h.update(Buffer.from(c, 'hex'));
  return h.digest('hex');
}

/** The chunks the stored extents overlap. */
export function touchedChunks(extents: StoredExtent[]): Set<number> {
  const out = new Set<number>();
  for (const [offset, length] of extents) for (let c = Math.floor(offset / CHUNK_SIZE); c * CHUNK_SIZE < offset + length; c++) out.add(c);
  return out;
}
