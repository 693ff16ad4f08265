/**
 * What `qemu-img info` shows about a qcow2 image that matters to nbdd users, for
 * `nbdd info --json`: sizes, version, features, the backing chain and the persistent bitmaps.
 */
import {
  BITMAP_AUTO,
  BITMAP_IN_USE,
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
} from './format/index.js';
import type { ImageLayer } from './layer.js';
import { openQcow2, type OpenQcow2Options } from './open.js';

export interface Qcow2BitmapInfo {
  name: string;
  granularity: number;
  /** As qemu-img info names them: 'in-use', 'auto'. */
  flags: string[];
}

export interface Qcow2Description {
  format: 'qcow2';
  filename: string;
  virtualSize: number;
  clusterSize: number;
  version: 2 | 3;
  /** qemu-img's name for the version: '0.10' (v2) or '1.1' (v3). */
  compat: '0.10' | '1.1';
  refcountBits: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  compressionType: 'zlib' | 'zstd';
  dirty: boolean;
  corrupt: boolean;
  /** The backing file name as stored in the image, if any. */
  backingFile?: string;
  backingFormat?: string;
  /** Resolved backing files, nearest first. */
  backingChain: { filename: string; format: 'qcow2' | 'raw'; virtualSize: number }[];
  bitmaps: Qcow2BitmapInfo[];
  /** False when bitmaps exist but the autoclear bit says a program without bitmap support wrote the image. */
  bitmapsConsistent: boolean;
}

export async function describeQcow2(path: string, options: Pick<OpenQcow2Options, 'openRemote'> = {}): Promise<Qcow2Description> {
  const img = await openQcow2(path, { ...options, readOnly: true });
  try {
    const h = img.header;
    const chain: Qcow2Description['backingChain'] = [];
    for (let layer: ImageLayer | null = img.backing; layer; layer = layer.backing) {
      chain.push({ filename: layer.path, format: layer.format, virtualSize: layer.size });
    }
    const bitmaps = (await img.readBitmapDirectory()).map((b) => ({
      name: b.name,
      granularity: 2 ** b.granularityBits,
      flags: [...(b.flags & BITMAP_IN_USE ? ['in-use'] : []), ...(b.flags & BITMAP_AUTO ? ['auto'] : [])],
    }));
    return {
      format: 'qcow2',
      filename: path,
      virtualSize: img.size,
      clusterSize: img.geometry.clusterSize,
      version: h.version,
      compat: h.version === 2 ? '0.10' : '1.1',
      refcountBits: 1 << h.refcountOrder,
      extendedL2: img.geometry.extendedL2,
      lazyRefcounts: (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
      compressionType: h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
      dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
      ...(img.backingName !== null ? { backingFile: img.backingName } : {}),
      ...(img.extensions.backingFormat ? { backingFormat: img.extensions.backingFormat } : {}),
      backingChain: chain,
      bitmaps,
      bitmapsConsistent: bitmaps.length === 0 || (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n,
    };
  } finally {
    await img.close();
  }
}
