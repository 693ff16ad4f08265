/**
 * qcow2 on-disk structures: pure decode/encode functions and the limits they are checked against.
 * No I/O here. All integers are big-endian. Source: qemu docs/interop/qcow2.rst (see docs/qcow2.md).
 *
 * Every decoder bounds what it reads against the named limits below and throws `NbddError`
 * (EUCLEAN for a malformed image, ENOTSUP for a well-formed feature nbdd does not implement).
 */
import { Errno, NbddError } from '../../core/errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const MIN_CLUSTER_BITS = 9; // 512 B
export const MAX_CLUSTER_BITS = 21; // 2 MiB (QEMU's implementation limit)
export const MIN_CLUSTER_BITS_EXTENDED_L2 = 14;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
export const MAX_BACKING_NAME = 1023;
export const MAX_L1_BYTES = 32 * 1024 * 1024; // QEMU limit
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024; // QEMU limit
export const MAX_REFCOUNT_ORDER = 6;
/** Offsets and sizes are JavaScript numbers; anything at or above this is refused at the edge. */
export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;
/** Host offsets live in bits 9..55 of table entries. */
export const MAX_HOST_OFFSET = 2 ** 56;

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

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_FDE = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;

function corrupt(message: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: ${message}`);
}

function unsupported(message: string): NbddError {
  return new NbddError(Errno.ENOTSUP, `unsupported qcow2 image: ${message}`);
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
 * Header, at file offset 0 (v2 ends at 72; v3 fields up to `header_length`):
 *
 *   0 u32 magic            4 u32 version           8 u64 backing_file_offset  16 u32 backing_file_size
 *  20 u32 cluster_bits    24 u64 size             32 u32 crypt_method         36 u32 l1_size
 *  40 u64 l1_table_offset 48 u64 refcount_table_offset                        56 u32 refcount_table_clusters
 *  60 u32 nb_snapshots    64 u64 snapshots_offset
 *  v3: 72 u64 incompatible_features  80 u64 compatible_features  88 u64 autoclear_features
 *      96 u32 refcount_order  100 u32 header_length  104 u8 compression_type  105..111 padding
 *
 * `buf` holds at least the start of the file (the whole first cluster when available). Checks the
 * header on its own; `validateHeader` checks it against the file.
 */
export function decodeHeader(buf: Buffer): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(`truncated header (${buf.length} bytes, need ${V2_HEADER_LENGTH})`);
  const magic = buf.readUInt32BE(0);
  if (magic !== QCOW2_MAGIC) throw corrupt(`bad magic 0x${magic.toString(16)}`);
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw unsupported(`version ${version} (nbdd reads versions 2 and 3)`);
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_DEFLATE;
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) throw corrupt(`truncated v3 header (${buf.length} bytes, need ${V3_MIN_HEADER_LENGTH})`);
    incompatibleFeatures = buf.readBigUInt64BE(72);
    compatibleFeatures = buf.readBigUInt64BE(80);
    autoclearFeatures = buf.readBigUInt64BE(88);
    refcountOrder = buf.readUInt32BE(96);
    headerLength = buf.readUInt32BE(100);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0) throw corrupt(`header_length ${headerLength} (v3 needs >= 104 and a multiple of 8)`);
    if (buf.length < headerLength) throw corrupt(`truncated header (${buf.length} bytes, header_length ${headerLength})`);
    if (headerLength > 104) compressionType = buf[104]!;
  }
  const header: Qcow2Header = {
    version,
    backingFileOffset: readU64(buf, 8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits: buf.readUInt32BE(20),
    size: readU64(buf, 24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: readU64(buf, 40, 'l1_table_offset'),
    refcountTableOffset: readU64(buf, 48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: readU64(buf, 64, 'snapshots_offset'),
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
  };
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
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > MAX_BACKING_NAME) throw corrupt(`backing file name length ${h.backingFileSize} (1..${MAX_BACKING_NAME})`);
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

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

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

/**
 * Header extensions, from `header_length` to the end marker, inside the first cluster:
 *
 *   0 u32 type   4 u32 length   8 data[length]   zero padding to a multiple of 8
 *
 * Feature name table entries (48 bytes): 0 u8 type, 1 u8 bit, 2..47 name (NUL padded).
 * Bitmaps extension (24 bytes): 0 u32 nb_bitmaps, 4 u32 reserved, 8 u64 directory_size,
 * 16 u64 directory_offset. FDE pointer: 0 u64 offset, 8 u64 length.
 * `cluster0` is the first cluster of the file; extensions may not run past it.
 */
export function decodeExtensions(cluster0: Buffer, header: Qcow2Header): HeaderExtensions {
  const ext: HeaderExtensions = { featureNames: [], unknownTypes: [], end: header.headerLength };
  const limit = header.backingFileOffset !== 0 ? Math.min(header.backingFileOffset, cluster0.length) : cluster0.length;
  const seen = new Set<number>();
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
    if (seen.has(type)) throw corrupt(`header extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    const data = cluster0.subarray(dataStart, dataStart + length);
    switch (type) {
      case EXT_BACKING_FORMAT:
        ext.backingFormat = data.toString('latin1');
        break;
      case EXT_FEATURE_NAMES:
        if (length % 48 !== 0) throw corrupt(`feature name table length ${length} is not a multiple of 48`);
        for (let i = 0; i < length; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          ext.featureNames.push({ type: data[i]!, bit: data[i + 1]!, name: raw.subarray(0, nul < 0 ? raw.length : nul).toString('utf8') });
        }
        break;
      case EXT_BITMAPS:
        if (length !== 24) throw corrupt(`bitmaps extension of ${length} bytes (expected 24)`);
        ext.bitmaps = { nbBitmaps: data.readUInt32BE(0), directorySize: readU64(data, 8, 'bitmap_directory_size'), directoryOffset: readU64(data, 16, 'bitmap_directory_offset') };
        if (ext.bitmaps.nbBitmaps === 0) throw corrupt('bitmaps extension with nb_bitmaps 0');
        if (data.readUInt32BE(4) !== 0) throw corrupt('bitmaps extension reserved field is not zero');
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

/** What opening must refuse, given the header and extensions. Throws with a named reason. */
export function checkFeatures(h: Qcow2Header, ext: HeaderExtensions): void {
  const unknown = h.incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    throw unsupported(`unknown incompatible feature(s): ${featureNames(unknown, FEATURE_TYPE.incompatible, ext.featureNames).join(', ')}`);
  }
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n || ext.externalDataFile !== undefined) {
    throw unsupported(`external data file${ext.externalDataFile ? ` '${ext.externalDataFile}'` : ''} (not implemented by nbdd)`);
  }
  if (h.cryptMethod !== CRYPT_NONE || ext.fde) {
    throw unsupported(`encrypted image (crypt_method ${h.cryptMethod}${h.cryptMethod === 1 ? ' AES' : h.cryptMethod === 2 ? ' LUKS' : ''}); nbdd does not implement qcow2 encryption`);
  }
  if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n && !ext.bitmaps) {
    throw corrupt('the bitmaps autoclear bit is set but there is no bitmaps extension');
  }
}

/**
 * L1 entry: bits 9..55 L2 table offset, bit 63 COPIED (refcount exactly 1). Entries are read as two
 * u32 words (`hi` = bits 32..63, `lo` = bits 0..31) so lookups never build a BigInt.
 */
export const ENTRY_COPIED_HI = 0x80000000;
export const ENTRY_COMPRESSED_HI = 0x40000000;
export const ENTRY_ZERO_LO = 0x1;
const OFFSET_HI_MASK = 0x00ffffff;
const OFFSET_LO_MASK = 0xfffffe00;

/** Host offset (bits 9..55) of a standard L1/L2 entry given as words. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI_MASK) * 2 ** 32 + ((lo & OFFSET_LO_MASK) >>> 0);
}

/** Writes a standard entry (offset | flags) as two big-endian words at `at`. */
export function writeEntry(buf: Buffer, at: number, offset: number, copied: boolean, zero: boolean): void {
  buf.writeUInt32BE(((copied ? ENTRY_COPIED_HI : 0) | Math.floor(offset / 2 ** 32)) >>> 0, at);
  buf.writeUInt32BE(((offset >>> 0) | (zero ? ENTRY_ZERO_LO : 0)) >>> 0, at + 4);
}

/**
 * Compressed cluster descriptor (bits 0..61, with x = 62 - (cluster_bits - 8)):
 * bits 0..x-1 host byte offset (unaligned), bits x..61 number of additional 512-byte sectors.
 * The compressed stream occupies `(sectors + 1) * 512 - (offset % 512)` bytes from `offset`.
 */
export function decodeCompressed(hi: number, lo: number, clusterBits: number): { offset: number; length: number } {
  const hiOffsetBits = 62 - (clusterBits - 8) - 32;
  const offset = (hi & ((1 << hiOffsetBits) - 1)) * 2 ** 32 + (lo >>> 0);
  const sectors = (hi & 0x3fffffff) >>> hiOffsetBits;
  return { offset, length: (sectors + 1) * 512 - (offset % 512) };
}

/**
 * Refcount block entries are `1 << order` bits wide: sub-byte widths pack LSB first within a byte,
 * wider ones are big-endian. 64-bit values above 2^53 are reported as MAX_SAFE_INTEGER.
 */
export function getRefcount(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >> order;
      return (block[Math.floor(index / perByte)]! >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
    case 3:
      return block[index]!;
    case 4:
      return block.readUInt16BE(index * 2);
    case 5:
      return block.readUInt32BE(index * 4);
    default: {
      const hi = block.readUInt32BE(index * 8);
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + block.readUInt32BE(index * 8 + 4);
    }
  }
}

export function setRefcount(block: Buffer, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >> order;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    default:
      writeU64(block, index * 8, value);
  }
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

/** Geometry derived from a header, used on every lookup. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntrySize: number;
  l2Entries: number;
  /** Subcluster size (cluster size / 32 with extended L2, else the cluster size). */
  unitSize: number;
  refcountOrder: number;
  /** Refcount entries per refcount block. */
  refcountsPerBlock: number;
}

export function geometryOf(h: Qcow2Header): Geometry {
  const clusterSize = 2 ** h.clusterBits;
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l2EntrySize = extendedL2 ? 16 : 8;
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    extendedL2,
    l2EntrySize,
    l2Entries: clusterSize / l2EntrySize,
    unitSize: extendedL2 ? clusterSize / 32 : clusterSize,
    refcountOrder: h.refcountOrder,
    refcountsPerBlock: (clusterSize * 8) >> h.refcountOrder,
  };
}

export interface BitmapDirectoryEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  extraDataSize: number;
}

export const BITMAP_IN_USE = 1 << 0;
export const BITMAP_AUTO = 1 << 1;
export const MAX_BITMAP_NAME = 1023;
/** QEMU's limit on the bitmap directory: 65535 entries of at most 1024 bytes. */
export const MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;

/**
 * Bitmap directory entries, back to back, each padded to 8 bytes:
 *   0 u64 bitmap_table_offset  8 u32 bitmap_table_size  12 u32 flags  16 u8 type
 *  17 u8 granularity_bits     18 u16 name_size          20 u32 extra_data_size
 *  24 extra_data[extra_data_size]  name[name_size]  zero padding to 8
 */
export function decodeBitmapDirectory(dir: Buffer, count: number): BitmapDirectoryEntry[] {
  const entries: BitmapDirectoryEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 24 > dir.length) throw corrupt(`bitmap directory truncated at entry ${i}`);
    const nameSize = dir.readUInt16BE(off + 18);
    const extraDataSize = dir.readUInt32BE(off + 20);
    if (nameSize === 0 || nameSize > MAX_BITMAP_NAME) throw corrupt(`bitmap ${i} name size ${nameSize}`);
    const nameStart = off + 24 + extraDataSize;
    if (nameStart + nameSize > dir.length) throw corrupt(`bitmap directory entry ${i} runs past the directory`);
    entries.push({
      tableOffset: readU64(dir, off, 'bitmap_table_offset'),
      tableSize: dir.readUInt32BE(off + 8),
      flags: dir.readUInt32BE(off + 12),
      type: dir[off + 16]!,
      granularityBits: dir[off + 17]!,
      extraDataSize,
      name: dir.subarray(nameStart, nameStart + nameSize).toString('utf8'),
    });
    off = Math.ceil((nameStart + nameSize) / 8) * 8;
  }
  return entries;
}

/** The v3 header length nbdd writes (through compression_type and its padding), as QEMU does. */
export const V3_HEADER_LENGTH = 112;

/** Encodes a v3 header (layout above `decodeHeader`) into the first `V3_HEADER_LENGTH` bytes. */
export function encodeHeader(h: Qcow2Header): Buffer {
  const buf = Buffer.alloc(V3_HEADER_LENGTH);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  writeU64(buf, 8, h.backingFileOffset);
  buf.writeUInt32BE(h.backingFileSize, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  writeU64(buf, 24, h.size);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  writeU64(buf, 40, h.l1TableOffset);
  writeU64(buf, 48, h.refcountTableOffset);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(buf, 64, h.snapshotsOffset);
  buf.writeBigUInt64BE(h.incompatibleFeatures, 72);
  buf.writeBigUInt64BE(h.compatibleFeatures, 80);
  buf.writeBigUInt64BE(h.autoclearFeatures, 88);
  buf.writeUInt32BE(h.refcountOrder, 96);
  buf.writeUInt32BE(V3_HEADER_LENGTH, 100);
  buf[104] = h.compressionType;
  return buf;
}

/** One header extension: type, length, data, zero padding to 8 bytes. */
export function encodeExtension(type: number, data: Buffer): Buffer {
  const buf = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  buf.writeUInt32BE(type, 0);
  buf.writeUInt32BE(data.length, 4);
  data.copy(buf, 8);
  return buf;
}
