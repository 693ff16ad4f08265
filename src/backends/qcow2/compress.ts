/**
 * Decompression of qcow2 compressed clusters: raw deflate (compression_type 0, node:zlib) and
 * zstd (compression_type 1, the pure-JS `fzstd`). The input is the whole sector run the L2 entry
 * names, which usually ends with unrelated bytes (the start of the next compressed cluster), so
 * both decoders stop at the end of their stream: deflate by itself, zstd by measuring the frame.
 */
import { inflateRaw, constants as zlibConstants } from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { Errno, NbddError } from '../../core/errors.js';
import { COMPRESSION_DEFLATE } from './format/index.js';

const ZSTD_MAGIC = 0xfd2fb528; // little-endian on disk: 28 b5 2f fd

function bad(message: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: compressed cluster: ${message}`);
}

/**
 * Length in bytes of the zstd frame at the start of `src` (RFC 8878 §3.1.1):
 *   magic u32le | frame header descriptor u8 | [window descriptor u8] | [dictionary id 1/2/4]
 *   | [frame content size 1/2/4/8] | blocks (u24le header: bit 0 last, bits 1-2 type,
 *   bits 3-23 size; RLE blocks carry 1 byte) | [checksum u32]
 */
export function zstdFrameLength(src: Uint8Array): number {
  if (src.length < 6) throw bad('zstd frame truncated');
  if ((src[0]! | (src[1]! << 8) | (src[2]! << 16) | (src[3]! << 24)) >>> 0 !== ZSTD_MAGIC) throw bad('no zstd frame magic');
  const fhd = src[4]!;
  const singleSegment = (fhd >> 5) & 1;
  const fcsFlag = fhd >> 6;
  const dictIdBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = fcsFlag === 0 ? singleSegment : [0, 2, 4, 8][fcsFlag]!;
  let pos = 5 + (singleSegment ? 0 : 1) + dictIdBytes + fcsBytes;
  for (;;) {
    if (pos + 3 > src.length) throw bad('zstd frame runs past the compressed data');
    const header = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    const type = (header >> 1) & 3;
    if (type === 3) throw bad('reserved zstd block type');
    pos += 3 + (type === 1 ? 1 : header >>> 3);
    if (header & 1) break;
  }
  if ((fhd >> 2) & 1) pos += 4;
  if (pos > src.length) throw bad('zstd frame runs past the compressed data');
  return pos;
}

function inflateRawAsync(src: Buffer, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // SYNC_FLUSH: accept input that stops without a final block once the cluster is complete.
    inflateRaw(src, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: clusterSize }, (err, out) =>
      err ? reject(bad(`deflate: ${err.message}`)) : resolve(out),
    );
  });
}

/**
 * Decompresses one cluster. `src` is owned by the caller and not kept; the result is a new buffer
 * of exactly `clusterSize` bytes. Throws EUCLEAN when the stream is malformed or too short.
 */
export async function decompressCluster(type: number, src: Buffer, clusterSize: number): Promise<Buffer> {
  let out: Buffer;
  if (type === COMPRESSION_DEFLATE) {
    out = await inflateRawAsync(src, clusterSize);
  } else {
    const frame = src.subarray(0, zstdFrameLength(src));
    const target = Buffer.alloc(clusterSize);
    let produced: Uint8Array;
    try {
      produced = zstdDecompress(frame, target);
    } catch (err) {
      throw bad(`zstd: ${(err as Error).message}`);
    }
    out = produced === target ? target : Buffer.from(produced.buffer, produced.byteOffset, produced.length);
  }
  if (out.length !== clusterSize) throw bad(`decompressed to ${out.length} bytes, expected ${clusterSize}`);
  return out;
}
