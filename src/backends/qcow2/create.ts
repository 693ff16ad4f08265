/**
 * Creating an empty qcow2 v3 image (what `nbdd create -f qcow2` does): the layout is computed by
 * a pure function, then written to a new file.
 *
 * Layout: cluster 0 header (+ backing format extension, end marker, backing file name), then the
 * refcount table, the refcount blocks covering every cluster in use, and an all-zero L1 table.
 */
import { open } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { Errno, NbddError } from '../../core/errors.js';
import { isNbdUri } from '../../nbd/uri.js';
import {
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  INCOMPAT_COMPRESSION,
  EXT_END,
  MAX_BACKING_NAME,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MIN_CLUSTER_BITS,
  V3_HEADER_LENGTH,
  encodeExtension,
  encodeHeader,
  setRefcount,
  writeU64,
} from './format/index.js';
import { openQcow2 } from './open.js';
import { probeFormat } from '../probe.js';

export const DEFAULT_CLUSTER_SIZE = 64 * 1024;
const REFCOUNT_ORDER = 4; // 16-bit refcounts, QEMU's default

export interface NewImageLayout {
  /** Byte ranges to write; everything else in `[0, fileLength)` is zero. */
  chunks: { offset: number; data: Buffer }[];
  fileLength: number;
}

export interface NewImageSpec {
  size: number;
  clusterSize: number;
  backingName?: string;
  backingFormat?: string;
  /** COMPRESSION_DEFLATE (the default) or COMPRESSION_ZSTD, which sets the incompatible bit qemu 5.1+ reads. */
  compressionType?: number;
}

function invalid(message: string): NbddError {
  return new NbddError(Errno.EINVAL, message);
}

/** Computes the bytes of an empty image. Throws EINVAL for sizes or names qcow2 cannot hold. */
export function layoutNewImage(spec: NewImageSpec): NewImageLayout {
  const cs = spec.clusterSize;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid(`cluster size ${cs} must be a power of two from 512 B to 2 MiB`);
  }
  if (!Number.isSafeInteger(spec.size) || spec.size <= 0) throw invalid(`image size ${spec.size} is out of range`);
  const l1Size = Math.ceil(spec.size / cs / (cs / 8));
  if (l1Size * 8 > MAX_L1_BYTES) throw invalid(`image size ${spec.size} needs an L1 table over ${MAX_L1_BYTES} bytes with ${cs}-byte clusters`);

  const extensions: Buffer[] = [];
  if (spec.backingFormat) extensions.push(encodeExtension(EXT_BACKING_FORMAT, Buffer.from(spec.backingFormat, 'utf8')));
  extensions.push(encodeExtension(EXT_END, Buffer.alloc(0)));
  const name = spec.backingName ? Buffer.from(spec.backingName, 'utf8') : null;
  if (name && name.length > MAX_BACKING_NAME) throw invalid(`backing file name longer than ${MAX_BACKING_NAME} bytes`);
  const extBytes = extensions.reduce((n, e) => n + e.length, 0);
  const nameOffset = V3_HEADER_LENGTH + extBytes;
  if (nameOffset + (name?.length ?? 0) > cs) throw invalid(`header and backing file name do not fit in one ${cs}-byte cluster`);

  // Clusters: header, refcount table (t), refcount blocks (b), L1 (l); b and t depend on the total.
  const l = Math.ceil((l1Size * 8) / cs);
  const perBlock = (cs * 8) >> REFCOUNT_ORDER;
  let t = 1;
  let b = 1;
  for (;;) {
    const total = 1 + t + b + l;
    const needB = Math.ceil(total / perBlock);
    const needT = Math.ceil((needB * 8) / cs);
    if (needB === b && needT === t) break;
    b = needB;
    t = needT;
  }
  const total = 1 + t + b + l;

  const header = encodeHeader({
    version: 3,
    backingFileOffset: name ? nameOffset : 0,
    backingFileSize: name?.length ?? 0,
    clusterBits,
    size: spec.size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: (1 + t + b) * cs,
    refcountTableOffset: cs,
    refcountTableClusters: t,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: spec.compressionType === COMPRESSION_ZSTD ? INCOMPAT_COMPRESSION : 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: REFCOUNT_ORDER,
    headerLength: V3_HEADER_LENGTH,
    compressionType: spec.compressionType ?? COMPRESSION_DEFLATE,
  });
  const cluster0 = Buffer.concat([header, ...extensions, name ?? Buffer.alloc(0)]);
  const table = Buffer.alloc(t * cs);
  const blocks = Buffer.alloc(b * cs);
  for (let i = 0; i < b; i++) writeU64(table, i * 8, (1 + t + i) * cs);
  for (let c = 0; c < total; c++) {
    setRefcount(blocks.subarray(Math.floor(c / perBlock) * cs), c % perBlock, REFCOUNT_ORDER, 1);
  }
  return {
    chunks: [
      { offset: 0, data: cluster0 },
      { offset: cs, data: table },
      { offset: (1 + t) * cs, data: blocks },
    ],
    fileLength: total * cs,
  };
}

export interface CreateQcow2Options {
  /** Virtual size; defaults to the backing file's. */
  size?: number;
  clusterSize?: number;
  /** Backing file name as stored (relative names are relative to the new image's directory). */
  backing?: string;
  /** 'qcow2' or 'raw'; probed from the backing file when omitted (raw for an NBD URI). */
  backingFormat?: string;
  /** The size of the export an NBD URI backing names (the caller connects; without it a URI needs `size`). */
  remoteSize?: (uri: string) => Promise<number>;
  /** What compressed clusters use (`writeCompressed`): COMPRESSION_DEFLATE (default) or COMPRESSION_ZSTD. */
  compressionType?: number;
}

/** Creates (or overwrites, as qemu-img does) an empty qcow2 v3 image. */
export async function createQcow2(path: string, options: CreateQcow2Options): Promise<void> {
  let size = options.size;
  let backingFormat = options.backingFormat;
  if (options.backing && isNbdUri(options.backing)) {
    backingFormat ??= 'raw';
    if (backingFormat !== 'raw') throw invalid(`backing format '${backingFormat}' for an NBD export: the export is a raw layer (-F raw)`);
    if (size === undefined) {
      if (!options.remoteSize) throw invalid('an image size is needed for an NBD URI backing file');
      size = await options.remoteSize(options.backing);
    }
  } else if (options.backing) {
    const backingPath = isAbsolute(options.backing) ? options.backing : resolve(dirname(path), options.backing);
    backingFormat ??= await probeFormat(backingPath);
    if (backingFormat !== 'qcow2' && backingFormat !== 'raw') throw invalid(`backing format '${backingFormat}' is not supported (qcow2 or raw)`);
    if (size === undefined) size = await virtualSize(backingPath, backingFormat);
  }
  if (size === undefined) throw invalid('an image size is needed (or a backing file to take it from)');
  const layout = layoutNewImage({ size, clusterSize: options.clusterSize ?? DEFAULT_CLUSTER_SIZE, backingName: options.backing, backingFormat: options.backing ? backingFormat : undefined, compressionType: options.compressionType });
  const fh = await open(path, 'w', 0o644);
  try {
    await fh.truncate(layout.fileLength);
    for (const c of layout.chunks) await fh.write(c.data, 0, c.data.length, c.offset);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

async function virtualSize(path: string, format: string): Promise<number> {
  if (format === 'raw') {
    const fh = await open(path, 'r');
    try {
      return (await fh.stat()).size;
    } finally {
      await fh.close();
    }
  }
  const img = await openQcow2(path, { readOnly: true, openBacking: false });
  await img.close();
  return img.size;
}
