/**
 * `nbdd restore` and `nbdd verify`: reading points back.
 *
 * Restore reads the point through its qcow2 chain chunk by chunk, checks each chunk against the
 * sum the manifest recorded, and writes it to the output: a new raw or qcow2 file (sparse: zero
 * chunks are not written), a block device or an NBD URI (zero chunks written as zeroes).
 *
 * Verify checks every point's qcow2 structure (the reference scan of `nbdd check`), the sum of
 * every data range the point stores (read from its file alone), and the sum of every chunk of
 * the disk at that point (read through the chain). The first mismatch names the point and offset.
 */
import { createHash } from 'node:crypto';
import { statSync } from 'node:fs';
import fsp from 'node:fs/promises';
import type { Backend } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import { openImage } from '../backends/open.js';
import { checkQcow2 } from '../backends/qcow2/check/index.js';
import { createQcow2 } from '../backends/qcow2/create.js';
import { openQcow2 } from '../backends/qcow2/open.js';
import { isNbdUri } from '../nbd/uri.js';
import { chunkSums } from './copy.js';
import { Progress } from './progress.js';
import { CHUNK_SIZE, Repo, type Point } from './repo.js';
import { isAllZero } from '../core/zeroes.js';
import { BLOCK_SIZE, blockSumsOf, chunkSum, rangeSum, zeroBlockSum, zeroChunkSum } from './sums.js';

export interface RestoreOptions {
  point?: string;
  format?: 'raw' | 'qcow2';
  progress?: boolean;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');


/** Opens OUTPUT for writing; `fresh` when it was just created (all zero already). */
async function openOutput(output: string, size: number, format: 'raw' | 'qcow2'): Promise<{ out: Backend; fresh: boolean }> {
  if (isNbdUri(output)) {
    const out = await openImage(output, { reconnectDelayMs: 0 });
    if (out.size < size) throw new NbddError(Errno.ENOSPC, `${output} has ${out.size} bytes; the point needs ${size}`);
    return { out, fresh: false };
  }
  const st = statSync(output, { throwIfNoEntry: false });
  if (st?.isBlockDevice()) {
    const out = await openImage(output, { format: 'raw' });
    if (out.size < size) throw new NbddError(Errno.ENOSPC, `${output} has ${out.size} bytes; the point needs ${size}`);
    return { out, fresh: false };
  }
  if (st) throw new NbddError(Errno.EEXIST, `${output} exists; restore writes a new file (or a block device, or an NBD URI)`);
  if (format === 'qcow2') await createQcow2(output, { size });
  else {
    const fh = await fsp.open(output, 'wx', 0o644);
    try {
      await fh.truncate(size);
    } finally {
      await fh.close();
    }
  }
  return { out: await openImage(output, { format }), fresh: true };
}

/** Reads chunk `i` of `disk`, or null when the image says it is all zero. */
async function readChunk(disk: Backend, i: number): Promise<{ offset: number; length: number; data: Buffer | null }> {
  const offset = i * CHUNK_SIZE;
  const length = Math.min(CHUNK_SIZE, disk.size - offset);
  const status = disk.blockStatus ? await disk.blockStatus(offset, length) : [];
  if (status.length === 1 && status[0]!.zero && status[0]!.length >= length) return { offset, length, data: null };
  return { offset, length, data: await disk.read(offset, length) };
}

/** The chunk's sum (sums.ts) from what readChunk returned. */
const sumOf = (c: { length: number; data: Buffer | null }): string => (c.data ? chunkSum(blockSumsOf(c.data)) : zeroChunkSum(c.length));

function mismatch(p: Point, offset: number, what: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `point ${p.id} (${p.file}): ${what} at offset ${offset} does not match the manifest`);
}

export async function restore(repoDir: string, output: string, options: RestoreOptions = {}): Promise<{ point: string; bytesWritten: number }> {
  const repo = await Repo.open(repoDir);
  const p = repo.point(options.point);
  const disk = await openQcow2(repo.path(p.file), { readOnly: true });
  let bytesWritten = 0;
  try {
    const { out, fresh } = await openOutput(output, p.virtualSize, options.format ?? 'raw');
    try {
      const count = Math.ceil(p.virtualSize / CHUNK_SIZE);
      const progress = new Progress(`restore ${p.id}`, p.virtualSize, options.progress ?? false);
      for (let i = 0; i < count; i++) {
        const c = await readChunk(disk, i);
        if (sumOf(c) !== p.chunks[i]) throw mismatch(p, c.offset, `the ${c.length}-byte chunk`);
        if (c.data && !isAllZero(c.data)) {
          await out.write(c.offset, c.data);
          bytesWritten += c.length;
        } else if (!fresh) {
          if (out.writeZeroes) await out.writeZeroes(c.offset, c.length);
          else await out.write(c.offset, Buffer.alloc(c.length));
        }
        progress.update(c.offset + c.length);
      }
      progress.done();
      await out.flush?.();
    } finally {
      await out.close();
    }
  } finally {
    await disk.close();
  }
  return { point: p.id, bytesWritten };
}

export interface VerifyReport {
  points: { id: string; ok: true; extents: number; chunks: number }[];
}

/** Verifies `point` (default every point); throws EUCLEAN naming the first bad point and offset. */
export async function verify(repoDir: string, point?: string): Promise<VerifyReport> {
  const repo = await Repo.open(repoDir);
  const targets = point === undefined ? repo.points : repo.chainOf(repo.point(point));
  const report: VerifyReport = { points: [] };
  for (const p of targets) {
    const path = repo.path(p.file);
    const check = await checkQcow2(path);
    if (check.corruptions > 0 || check.checkErrors > 0) throw new NbddError(Errno.EUCLEAN, `point ${p.id} (${p.file}): the qcow2 image has ${check.corruptions} corruption(s)`);
    const own = await openQcow2(path, { readOnly: true, openBacking: false });
    try {
      for (const [offset, length, sum] of p.extents) {
        const data = await own.read(offset, length);
        const actual = p.extentSums === 'slices' ? rangeSum(blockSumsOf(data)) : sha(data);
        if (sum === null ? !isAllZero(data) : actual !== sum) throw mismatch(p, offset, `the stored ${length}-byte range`);
      }
    } finally {
      await own.close();
    }
    const disk = await openQcow2(path, { readOnly: true });
    try {
      const { chunks: sums, computed } = await chunkSums(disk, new Map(), null);
      const bad = sums.findIndex((sum, i) => sum !== p.chunks[i]);
      if (bad >= 0 || sums.length !== p.chunks.length) {
        const at = bad >= 0 ? bad : Math.min(sums.length, p.chunks.length);
        throw mismatch(p, at * CHUNK_SIZE, `the disk's ${Math.min(CHUNK_SIZE, disk.size - at * CHUNK_SIZE)}-byte chunk`);
      }
      // The block sums the next incremental will build on must be the disk's.
      const recorded = await repo.blockSumsAt(p, true);
      if (recorded) {
        for (const [b, sum] of computed) {
          if (!(recorded.get(b) ?? zeroBlockSum(Math.min(BLOCK_SIZE, disk.size - b * BLOCK_SIZE))).equals(sum)) {
            throw mismatch(p, b * BLOCK_SIZE, `the block sums on record (${p.sums}) for the ${Math.min(BLOCK_SIZE, disk.size - b * BLOCK_SIZE)}-byte block`);
          }
        }
      }
    } finally {
      await disk.close();
    }
    report.points.push({ id: p.id, ok: true, extents: p.extents.length, chunks: p.chunks.length });
  }
  return report;
}
