/**
 * Header extensions (qemu docs/interop/qcow2.rst, "Header extensions"): the area from
 * `header_length` to the end marker, inside the first cluster. Decode with every bound checked,
 * encode one extension, and the pure half of rewriting the area with a new bitmaps extension.
 *
 *   0 u32 type   4 u32 length   8 data[length]   zero padding to a multiple of 8
 *
 * Feature name table entries (48 bytes): 0 u8 type, 1 u8 bit, 2..47 name (NUL padded).
 * FDE pointer: 0 u64 offset, 8 u64 length. The bitmaps extension is decoded by ./bitmaps.ts.
 */
import { decodeBitmapsExtension, encodeBitmapsExtension, type BitmapsExtension } from './bitmaps.js';
import { corrupt, hasBackingName, readU64, type FeatureName, type Qcow2Header } from './header.js';

/** Extension types (the spec's magic numbers). End of the area: */
export const EXT_END = 0x00000000;
/** The backing file's format name (e.g. `raw`, `qcow2`). */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Names for feature bits, shown in messages about them. */
export const EXT_FEATURE_NAMES = 0x6803f857;
/** Where the persistent bitmaps' directory is (./bitmaps.ts). */
export const EXT_BITMAPS = 0x23852875;
/** Full disk encryption header pointer (nbdd refuses encrypted images). */
export const EXT_FDE = 0x0537be77;
/** External data file name (nbdd refuses those images). */
export const EXT_DATA_FILE = 0x44415441;

const FEATURE_NAME_ENTRY = 48;

export interface HeaderExtensions {
  backingFormat?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  externalDataFile?: string;
  /** Full-disk encryption header pointer (offset, length). */
  fde?: { offset: number; length: number };
  /** Types nbdd does not interpret; left in place in the file (nbdd never rewrites the area). */
  unknownTypes: number[];
  /** File offset just past the end-of-extensions marker (or where the area ended). */
  end: number;
}

/** Decodes the extension area of `cluster0` (the file's first cluster); it may not run past it. */
export function decodeExtensions(cluster0: Buffer, header: Qcow2Header): HeaderExtensions {
  const ext: HeaderExtensions = { featureNames: [], unknownTypes: [], end: header.headerLength };
  const clusterSize = 2 ** header.clusterBits;
  const limit = header.backingFileOffset !== 0 ? Math.min(header.backingFileOffset, cluster0.length) : cluster0.length;
  let off = header.headerLength;
  for (;;) {
    if (off + 8 > limit) {
      // v2 images without any extension may end right at the backing name or the cluster end.
      ext.end = off;
      return ext;
    }
    const type = cluster0.readUInt32BE(off);
    const length = cluster0.readUInt32BE(off + 4);
    if (type === EXT_END) {
      ext.end = off + 8;
      return ext;
    }
    const dataStart = off + 8;
    if (length > limit - dataStart) throw corrupt(`header extension 0x${type.toString(16)} of ${length} bytes runs past the header area`);
    // A repeated extension replaces the earlier one, as QEMU reads them.
    const data = cluster0.subarray(dataStart, dataStart + length);
    switch (type) {
      case EXT_BACKING_FORMAT: {
        // As qemu: the name ends at a NUL, and an empty one means "probe the format".
        const nul = data.indexOf(0);
        const name = data.subarray(0, nul < 0 ? data.length : nul).toString('latin1');
        if (name) ext.backingFormat = name;
        else delete ext.backingFormat;
        break;
      }
      case EXT_FEATURE_NAMES:
        if (length % FEATURE_NAME_ENTRY !== 0) throw corrupt(`feature name table length ${length} is not a multiple of ${FEATURE_NAME_ENTRY}`);
        for (let i = 0; i < length; i += FEATURE_NAME_ENTRY) {
          const raw = data.subarray(i + 2, i + FEATURE_NAME_ENTRY);
          const nul = raw.indexOf(0);
          ext.featureNames.push({ type: data[i]!, bit: data[i + 1]!, name: raw.subarray(0, nul < 0 ? raw.length : nul).toString('utf8') });
        }
        break;
      case EXT_BITMAPS:
        // Version 2 has no autoclear bits to say the bitmaps are current: qemu ignores them there.
        if (header.version === 3) ext.bitmaps = decodeBitmapsExtension(data, clusterSize);
        break;
      case EXT_FDE:
        if (length !== 16) throw corrupt(`encryption header pointer of ${length} bytes (expected 16)`);
        ext.fde = { offset: readU64(data, 0, 'encryption header offset'), length: readU64(data, 8, 'encryption header length') };
        break;
      case EXT_DATA_FILE:
        ext.externalDataFile = data.toString('utf8');
        break;
      default:
        ext.unknownTypes.push(type);
    }
    off = dataStart + Math.ceil(length / 8) * 8;
  }
}

/** One header extension: type, length, data, zero padding to 8 bytes. */
export function encodeExtension(type: number, data: Buffer): Buffer {
  const buf = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  buf.writeUInt32BE(type, 0);
  buf.writeUInt32BE(data.length, 4);
  data.copy(buf, 8);
  return buf;
}

/**
 * The bytes to write at `header_length` so that the area holds every extension of `cluster0`
 * but the bitmaps one, then `bitmaps` (none when null), the end marker, and the backing file name
 * right after; and the new backing_file_offset. Null when it does not fit the first cluster.
 */
export function withBitmapsExtension(cluster0: Buffer, header: Qcow2Header, bitmaps: BitmapsExtension | null): { bytes: Buffer; backingFileOffset: number } | null {
  const kept: Buffer[] = [];
  for (let off = header.headerLength; off + 8 <= cluster0.length; ) {
    const type = cluster0.readUInt32BE(off);
    const len = cluster0.readUInt32BE(off + 4);
    if (type === EXT_END) break;
    const next = off + 8 + Math.ceil(len / 8) * 8;
    if (type !== EXT_BITMAPS) kept.push(cluster0.subarray(off, next));
    off = next;
  }
  if (bitmaps) kept.push(encodeExtension(EXT_BITMAPS, encodeBitmapsExtension(bitmaps)));
  kept.push(encodeExtension(EXT_END, Buffer.alloc(0)));
  const backingName = hasBackingName(header) ? cluster0.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize) : null;
  const area = Buffer.concat(kept);
  if (header.headerLength + area.length + (backingName?.length ?? 0) > cluster0.length) return null;
  return {
    bytes: Buffer.concat([area, ...(backingName ? [Buffer.from(backingName)] : [])]),
    backingFileOffset: backingName ? header.headerLength + area.length : 0,
  };
}
