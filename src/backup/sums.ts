/**
 * The checksums of a disk in a backup repo, a two-level tree so that zeroes cost nothing and an
 * incremental re-reads only the chunks it changed:
 *
 *   block sum  = SHA-256 of one BLOCK_SIZE block (the disk's last block may be shorter)
 *   chunk sum  = SHA-256 over the chunk's block sums (32 bytes each, in order); CHUNK_SIZE chunks
 *   disk sum   = SHA-256 over the chunk sums (32 bytes each, in order)
 *
 * Every level is a function of the disk's bytes alone, whatever the repo stores them as.
 *
 * Each point also keeps the block sums it computed in a file beside it (`NNNN.sums`): a full point
 * every nonzero block's, an incremental every block it changed (zeroes included). Read from the
 * full point up, they give every block's sum at any point (a block on no record is zero), so an
 * incremental sums only the blocks it changed.
 */
import { createHash } from 'node:crypto';
import { isAllZero } from '../core/zeroes.js';

export const BLOCK_SIZE = 64 * 1024;
/** The disk is summed in chunks of this size; a point's disk checksum is over the chunk sums. */
export const CHUNK_SIZE = 4 * 1024 * 1024;

const ZERO = Buffer.alloc(BLOCK_SIZE);
const zeroBlockSums = new Map<number, Buffer>();

/** The sum of a block of `length` zero bytes. */
export function zeroBlockSum(length: number): Buffer {
  let s = zeroBlockSums.get(length);
  if (!s) zeroBlockSums.set(length, (s = createHash('sha256').update(ZERO.subarray(0, length)).digest()));
  return s;
}

export function blockSum(block: Buffer): Buffer {
  return isAllZero(block) ? zeroBlockSum(block.length) : createHash('sha256').update(block).digest();
}

/** The sums of the blocks of `data`, which starts on a block boundary. */
export function blockSumsOf(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < data.length; i += BLOCK_SIZE) out.push(blockSum(data.subarray(i, Math.min(data.length, i + BLOCK_SIZE))));
  return out;
}

/**
 * The sum of a stored range (a point's `extents`, with `extentSums: 'slices'`): the SHA-256 over
 * the SHA-256s of its BLOCK_SIZE slices from its start — for a block-aligned range, its block
 * sums, so the copy hashes the data once for both.
 */
export function rangeSum(sliceSums: Buffer[]): string {
  return chunkSum(sliceSums);
}

export function chunkSum(blockSums: Buffer[]): string {
  const h = createHash('sha256');
  for (const s of blockSums) h.update(s);
  return h.digest('hex');
}

/** The sum of the chunk at `offset` of `length` bytes, all zero. */
export function zeroChunkSum(length: number): string {
  const sums: Buffer[] = [];
  for (let at = 0; at < length; at += BLOCK_SIZE) sums.push(zeroBlockSum(Math.min(BLOCK_SIZE, length - at)));
  return chunkSum(sums);
}

export function diskSum(chunks: string[]): string {
  const h = createHash('sha256');
  for (const c of chunks) h.update(Buffer.from(c, 'hex'));
  return h.digest('hex');
}

export const BLOCKS_PER_CHUNK = CHUNK_SIZE / BLOCK_SIZE;

/** Block index → SHA-256 of the block (32 bytes). */
export type BlockSums = Map<number, Buffer>;

const RECORD = 8 + 32;

/** A block sums file: records of a u64be block index and the block's 32-byte SHA-256, indices ascending. */
export function encodeBlockSums(sums: BlockSums): Buffer {
  const indices = [...sums.keys()].sort((a, b) => a - b);
  const out = Buffer.alloc(indices.length * RECORD);
  indices.forEach((b, i) => {
    out.writeBigUInt64BE(BigInt(b), i * RECORD);
    sums.get(b)!.copy(out, i * RECORD + 8);
  });
  return out;
}

/** Decodes a block sums file into `into` (later records replace earlier ones); throws on a damaged file. */
export function decodeBlockSums(buf: Buffer, blockCount: number, into: BlockSums): void {
  if (buf.length % RECORD !== 0) throw new Error(`${buf.length} bytes is not a whole number of ${RECORD}-byte records`);
  let prev = -1;
  for (let at = 0; at < buf.length; at += RECORD) {
    const b = Number(buf.readBigUInt64BE(at));
    if (b <= prev || b >= blockCount) throw new Error(`record ${at / RECORD} names block ${b} (after ${prev}, of ${blockCount})`);
    prev = b;
    into.set(b, buf.subarray(at + 8, at + RECORD));
  }
}
