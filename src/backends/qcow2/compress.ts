/**
 * The codecs of qcow2 compressed clusters: raw deflate (compression_type 0, node:zlib) and zstd
 * (compression_type 1). Decompression input is the whole sector run the L2 entry names, which
 * usually ends with unrelated bytes (the start of the next compressed cluster), so both decoders
 * stop at the end of their stream: deflate by itself, zstd by measuring the frame. Both
 * directions run off the event loop: deflate in zlib's thread pool, zstd through koffi's
 * asynchronous calls into the system's libzstd (Node 20 has no zstd; Debian's dpkg needs
 * libzstd1, so it is on every machine nbdd installs on), with the pure-JS `fzstd` decoding where
 * libzstd does not load.
 */
import { lazyBuiltin } from '../../core/lazy-builtin.js';
import koffi from 'koffi';
import { decompress as zstdDecompress } from 'fzstd';
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import { Slots } from '../../core/slots.js';
import { COMPRESSION_DEFLATE, COMPRESSION_ZSTD } from './format/index.js';

/** `node:zlib`, loaded with the first deflate cluster. */
const zlib = lazyBuiltin<typeof import('node:zlib')>('node:zlib');

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
    const z = zlib();
    // SYNC_FLUSH: accept input that stops without a final block once the cluster is complete.
    z.inflateRaw(src, { finishFlush: z.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize }, (err, out) =>
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
    const z = tryZstd();
    if (z) {
      out = await zstdSlots.run(
        () =>
          new Promise<Buffer>((resolve, reject) => {
            const target = Buffer.allocUnsafe(clusterSize);
            z.decompress.async(target, clusterSize, frame, frame.length, (err: unknown, n: number | bigint) => {
              if (err) return reject(err);
              if (z.isError(n)) return reject(bad(`zstd: ${String(z.getErrorName(n))}`));
              resolve(target.subarray(0, Number(n)));
            });
          }),
      );
    } else {
      out = decompressZstdFrameJs(frame, clusterSize);
    }
  }
  if (out.length !== clusterSize) throw bad(`decompressed to ${out.length} bytes, expected ${clusterSize}`);
  return out;
}

/**
 * One zstd frame decoded by the pure-JavaScript `fzstd`, on this thread: the fallback where
 * libzstd does not load (exported so the tests run it where libzstd does). Throws EUCLEAN.
 */
export function decompressZstdFrameJs(frame: Uint8Array, clusterSize: number): Buffer {
  const target = Buffer.alloc(clusterSize);
  let produced: Uint8Array;
  try {
    produced = zstdDecompress(frame, target);
  } catch (err) {
    throw bad(`zstd: ${(err as Error).message}`);
  }
  return produced === target ? target : Buffer.from(produced.buffer, produced.byteOffset, produced.length);
}

/** qemu's deflate settings (qcow2-threads.c): a 4 KiB window, so qemu's inflate (-12) reads ours. */
const DEFLATE_WINDOW_BITS = 12;
/** zstd's default level, the one qemu compresses with. */
const ZSTD_LEVEL = 3;

type KoffiFunction = ReturnType<ReturnType<typeof koffi.load>['func']>;

interface Zstd {
  compress: KoffiFunction;
  decompress: KoffiFunction;
  isError: KoffiFunction;
  getErrorName: KoffiFunction;
}
let zstd: Zstd | null = null;
let zstdMissing = false;

/** libzstd when it loads (decompression falls back to fzstd without it). */
function tryZstd(): Zstd | null {
  if (zstd || zstdMissing) return zstd;
  try {
    return loadZstd();
  } catch {
    zstdMissing = true;
    return null;
  }
}

function loadZstd(): Zstd {
  if (zstd) return zstd;
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load('libzstd.so.1');
  } catch (err) {
    throw new NbddError(Errno.ENOTSUP, `zstd compression needs libzstd.so.1 (apt-get install libzstd1): ${messageOf(err)}`);
  }
  zstd = {
    compress: lib.func('size_t ZSTD_compress(void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)'),
    decompress: lib.func('size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t srcSize)'),
    isError: lib.func('unsigned int ZSTD_isError(size_t code)'),
    getErrorName: lib.func('const char *ZSTD_getErrorName(size_t code)'),
  };
  return zstd;
}

/** Whether `type` can be written here (deflate always; zstd where libzstd loads). Throws ENOTSUP naming what is missing. */
export function checkCompressionType(type: number): void {
  if (type === COMPRESSION_ZSTD) loadZstd();
  else if (type !== COMPRESSION_DEFLATE) throw new NbddError(Errno.ENOTSUP, `qcow2 compression type ${type} is not supported (0 deflate, 1 zstd)`);
}

/**
 * Compresses one cluster (`src`, exactly a cluster; the caller pads the image's last one). Returns
 * the stream, or null when it is longer than `limit` bytes (the cluster is better written plain).
 * `src` must not change until the promise settles.
 */
export function compressCluster(type: number, src: Buffer, limit: number): Promise<Buffer | null> {
  if (type === COMPRESSION_DEFLATE) {
    return new Promise((resolve, reject) => {
      zlib().deflateRaw(src, { windowBits: DEFLATE_WINDOW_BITS, memLevel: 9 }, (err, out) => (err ? reject(err) : resolve(out.length <= limit ? out : null)));
    });
  }
  const z = loadZstd();
  return zstdSlots.run(
    () =>
      new Promise<Buffer | null>((resolve, reject) => {
        // Room for the worst case is not needed: a stream over `limit` is not kept, and zstd
        // reports "destination too small" as an error code, which reads as "not worth it".
        const dst = Buffer.allocUnsafe(limit);
        z.compress.async(dst, limit, src, src.length, ZSTD_LEVEL, (err: unknown, n: number | bigint) => {
          if (err) return reject(err);
          resolve(z.isError(n) ? null : dst.subarray(0, Number(n)));
        });
      }),
  );
}

/** koffi refuses async calls past its queue (256); more in flight than worker threads gains nothing. */
const zstdSlots = new Slots(16);
