/**
 * The qcow2 header (qemu docs/interop/qcow2.rst, "Header"): field offsets by name, decode with
 * every bound checked, encode, feature bits and their names. Pure: no I/O. All integers are
 * big-endian. Throws `NbddError` (EUCLEAN for a malformed image, ENOTSUP for a well-formed
 * feature nbdd does not implement).
 */
import { Errno, NbddError } from '../../../core/errors.js';
import type { HeaderExtensions } from './extensions.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const MIN_CLUSTER_BITS = 9; // 512 B
export const MAX_CLUSTER_BITS = 21; // 2 MiB (QEMU's implementation limit)
export const MIN_CLUSTER_BITS_EXTENDED_L2 = 14;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** The v3 header length nbdd writes (through compression_type and its padding), as QEMU does. */
export const V3_HEADER_LENGTH = 112;
export const MAX_BACKING_NAME = 1023;
export const MAX_L1_BYTES = 32 * 1024 * 1024; // QEMU limit
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024; // QEMU limit
export const MAX_REFCOUNT_ORDER = 6;
/** Offsets and sizes are JavaScript numbers; anything at or above this is refused at the edge. */
export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;
/** Host offsets live in bits 9..55 of table entries. */
export const MAX_HOST_OFFSET = 2 ** 56;

/**
 * Byte offset of each header field (v2 ends at 72; v3 fields up to `header_length`). Every read
 * and every in-place rewrite of a header field goes through these names.
 */
export const HEADER = {
  magic: 0, // u32
  version: 4, // u32
  backingFileOffset: 8, // u64
  backingFileSize: 16, // u32
  clusterBits: 20, // u32
  size: 24, // u64
  cryptMethod: 32, // u32
  l1Size: 36, // u32
  l1TableOffset: 40, // u64
  refcountTableOffset: 48, // u64
  refcountTableClusters: 56, // u32
  nbSnapshots: 60, // u32
  snapshotsOffset: 64, // u64
  incompatibleFeatures: 72, // u64, v3
  compatibleFeatures: 80, // u64, v3
  autoclearFeatures: 88, // u64, v3
  refcountOrder: 96, // u32, v3
  headerLength: 100, // u32, v3
  compressionType: 104, // u8, v3 with header_length > 104
} as const;

/** The fields every version has, by width (version itself, the v3 fields and magic aside). */
const U32_FIELDS = ['backingFileSize', 'clusterBits', 'cryptMethod', 'l1Size', 'refcountTableClusters', 'nbSnapshots'] as const;
const U64_FIELDS = ['backingFileOffset', 'size', 'l1TableOffset', 'refcountTableOffset', 'snapshotsOffset'] as const;
const FEATURE_FIELDS = ['incompatibleFeatures', 'compatibleFeatures', 'autoclearFeatures'] as const;

/** The spec's name of a field, for messages: `l1TableOffset` → `l1_table_offset`. */
function specName(field: string): string {
  return field.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** Feature names nbdd knows, by (type, bit), for messages; the image's own table takes precedence. */
export const FEATURE_TYPE = { incompatible: 0, compatible: 1, autoclear: 2 } as const;
const KNOWN_FEATURE_NAMES: Record<string, string> = {
  '0:0': 'dirty bit',
  '0:1': 'corrupt bit',
  '0:2': 'external data file',
  '0:3': 'compression type',
  '0:4': 'extended L2 entries',
  '1:0': 'lazy refcounts',
  '2:0': 'bitmaps',
  '2:1': 'raw external data',
};
/** Incompatible bits this implementation understands (dirty and corrupt are handled at open). */
export const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/** Autoclear bits whose meaning nbdd preserves when writing. None: bitmaps are not kept in sync yet. */
export const SUPPORTED_AUTOCLEAR = 0n;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;

export function corrupt(message: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: ${message}`);
}

export function unsupported(message: string): NbddError {
  return new NbddError(Errno.ENOTSUP, `unsupported qcow2 image: ${message}`);
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** Reads a u64 as a number, refusing values that do not fit 53 bits. */
export function readU64(buf: Buffer, offset: number, what: string): number {
  const hi = buf.readUInt32BE(offset);
  const lo = buf.readUInt32BE(offset + 4);
  if (hi >= 0x200000) throw corrupt(`${what} 0x${buf.readBigUInt64BE(offset).toString(16)} is too large`);
  return hi * 2 ** 32 + lo;
}

export function writeU64(buf: Buffer, offset: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), offset);
  buf.writeUInt32BE(value >>> 0, offset + 4);
}

/** `n` as a big-endian u64. */
export function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  writeU64(b, 0, n);
  return b;
}

/** `n` as a big-endian u32. */
export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** A feature field (u64 of bits) as bytes, for rewriting it in place at `HEADER.<field>`. */
export function featureField(bits: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(bits);
  return b;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
}

/**
 * Decodes the header (fields at `HEADER`). `buf` holds at least the start of the file (the whole
 * first cluster when available). Checks the header on its own; open checks it against the file.
 */
export function decodeHeader(buf: Buffer): Qcow2Header {
  const H = HEADER;
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(`truncated header (${buf.length} bytes, need ${V2_HEADER_LENGTH})`);
  const magic = buf.readUInt32BE(H.magic);
  if (magic !== QCOW2_MAGIC) throw corrupt(`bad magic 0x${magic.toString(16)}`);
  const version = buf.readUInt32BE(H.version);
  if (version !== 2 && version !== 3) throw unsupported(`version ${version} (nbdd reads versions 2 and 3)`);
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_DEFLATE;
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) throw corrupt(`truncated v3 header (${buf.length} bytes, need ${V3_MIN_HEADER_LENGTH})`);
    incompatibleFeatures = buf.readBigUInt64BE(H.incompatibleFeatures);
    compatibleFeatures = buf.readBigUInt64BE(H.compatibleFeatures);
    autoclearFeatures = buf.readBigUInt64BE(H.autoclearFeatures);
    refcountOrder = buf.readUInt32BE(H.refcountOrder);
    headerLength = buf.readUInt32BE(H.headerLength);
    // The spec asks for a multiple of 8; qemu opens any length from 104 on, and so does nbdd.
    if (headerLength < V3_MIN_HEADER_LENGTH) throw corrupt(`header_length ${headerLength} (v3 needs >= 104)`);
    if (buf.length < headerLength) throw corrupt(`truncated header (${buf.length} bytes, header_length ${headerLength})`);
    if (headerLength > H.compressionType) compressionType = buf[H.compressionType]!;
  }
  const header = { version, incompatibleFeatures, compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType } as Qcow2Header;
  for (const f of U32_FIELDS) header[f] = buf.readUInt32BE(H[f]);
  for (const f of U64_FIELDS) header[f] = readU64(buf, H[f], specName(f));
  checkHeaderFields(header);
  return header;
}

function checkHeaderFields(h: Qcow2Header): void {
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`cluster_bits ${h.clusterBits} (supported ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}: 512 B to 2 MiB)`);
  }
  const clusterSize = 2 ** h.clusterBits;
  if (h.headerLength > clusterSize) throw corrupt(`header_length ${h.headerLength} exceeds the cluster size ${clusterSize}`);
  if (h.version === 2 && h.refcountOrder !== 4) throw corrupt('v2 image with refcount_order != 4');
  if (h.refcountOrder > MAX_REFCOUNT_ORDER) throw corrupt(`refcount_order ${h.refcountOrder} (max ${MAX_REFCOUNT_ORDER})`);
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n && h.clusterBits < MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw corrupt(`extended L2 entries need cluster_bits >= ${MIN_CLUSTER_BITS_EXTENDED_L2}, image has ${h.clusterBits}`);
  }
  const hasCompressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (hasCompressionBit !== (h.compressionType !== COMPRESSION_DEFLATE)) {
    throw corrupt(`compression_type ${h.compressionType} disagrees with the compression-type feature bit`);
  }
  if (h.compressionType !== COMPRESSION_DEFLATE && h.compressionType !== COMPRESSION_ZSTD) {
    throw unsupported(`compression_type ${h.compressionType} (nbdd knows 0 deflate and 1 zstd)`);
  }
  // An offset with size 0 is no backing file (as QEMU reads it); the offset still ends the extensions.
  if (hasBackingName(h)) {
    if (h.backingFileSize > MAX_BACKING_NAME) throw corrupt(`backing file name length ${h.backingFileSize} (at most ${MAX_BACKING_NAME})`);
    if (h.backingFileOffset + h.backingFileSize > clusterSize) throw corrupt('backing file name lies outside the first cluster');
  }
  for (const [what, off] of [['l1_table_offset', h.l1TableOffset], ['refcount_table_offset', h.refcountTableOffset], ['snapshots_offset', h.snapshotsOffset]] as const) {
    if (off % clusterSize !== 0) throw corrupt(`${what} 0x${off.toString(16)} is not aligned to the cluster size ${clusterSize}`);
  }
  if (h.refcountTableOffset === 0 || h.refcountTableClusters === 0) throw corrupt('no refcount table');
  if (h.refcountTableClusters * clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
    throw corrupt(`refcount table of ${h.refcountTableClusters} clusters exceeds ${MAX_REFCOUNT_TABLE_BYTES} bytes`);
  }
  if (h.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`l1_size ${h.l1Size} exceeds ${MAX_L1_BYTES} bytes`);
  const l2Entries = clusterSize / ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n ? 16 : 8);
  const needL1 = Math.ceil(h.size / clusterSize / l2Entries);
  if (h.l1Size < needL1) throw corrupt(`l1_size ${h.l1Size} too small for virtual size ${h.size} (needs ${needL1})`);
  if (h.l1Size > 0 && h.l1TableOffset === 0) throw corrupt('l1_size is non-zero but l1_table_offset is 0');
}

/** Encodes a v3 header (fields at `HEADER`) into the first `V3_HEADER_LENGTH` bytes. */
export function encodeHeader(h: Qcow2Header): Buffer {
  const H = HEADER;
  const buf = Buffer.alloc(V3_HEADER_LENGTH);
  buf.writeUInt32BE(QCOW2_MAGIC, H.magic);
  buf.writeUInt32BE(h.version, H.version);
  for (const f of U32_FIELDS) buf.writeUInt32BE(h[f], H[f]);
  for (const f of U64_FIELDS) writeU64(buf, H[f], h[f]);
  for (const f of FEATURE_FIELDS) buf.writeBigUInt64BE(h[f], H[f]);
  buf.writeUInt32BE(h.refcountOrder, H.refcountOrder);
  buf.writeUInt32BE(V3_HEADER_LENGTH, H.headerLength);
  buf[H.compressionType] = h.compressionType;
  return buf;
}

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

/** Names the set bits of `bits` using the image's feature name table, then nbdd's own names. */
export function featureNames(bits: bigint, type: number, table: readonly FeatureName[]): string[] {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((bits & (1n << BigInt(bit))) === 0n) continue;
    const fromImage = table.find((f) => f.type === type && f.bit === bit)?.name;
    names.push(fromImage ?? KNOWN_FEATURE_NAMES[`${type}:${bit}`] ?? `unknown feature bit ${bit}`);
  }
  return names;
}

/** What opening must refuse, given the header and extensions. Throws with a named reason. */
export function checkFeatures(h: Qcow2Header, ext: HeaderExtensions): void {
  const unknown = h.incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    throw unsupported(`unknown incompatible feature(s): ${featureNames(unknown, FEATURE_TYPE.incompatible, ext.featureNames).join(', ')}`);
  }
  // As qemu: a data file name without the incompatible bit is not used (the data is in this file).
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) {
    throw unsupported(`external data file${ext.externalDataFile ? ` '${ext.externalDataFile}'` : ''} (not implemented by nbdd)`);
  }
  if (h.cryptMethod !== CRYPT_NONE || ext.fde) {
    throw unsupported(`encrypted image (crypt_method ${h.cryptMethod}${h.cryptMethod === 1 ? ' AES' : h.cryptMethod === 2 ? ' LUKS' : ''}); nbdd does not implement qcow2 encryption`);
  }
  // The bitmaps autoclear bit without a bitmaps extension means no bitmaps, as qemu reads it.
}

/** Whether the header names a backing file: an offset and a non-zero length (QEMU ignores size 0). */
export function hasBackingName(h: Pick<Qcow2Header, 'backingFileOffset' | 'backingFileSize'>): boolean {
  return h.backingFileOffset !== 0 && h.backingFileSize !== 0;
}
