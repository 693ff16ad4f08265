/**
 * qcow2 tables (qemu docs/interop/qcow2.rst, "Cluster mapping", "Refcounts"): L1 and L2 entries,
 * compressed cluster descriptors, refcount entries of every width, the geometry derived from a
 * header, and the open-time checks of the L1 and refcount tables. Pure: no I/O.
 *
 * Entries are read as two u32 words (`hi` = bits 32..63, `lo` = bits 0..31) so lookups never
 * build a BigInt. L1 entry: bits 9..55 L2 table offset, bit 63 COPIED (refcount exactly 1).
 * L2 entry: bit 63 COPIED, bit 62 COMPRESSED, bits 9..55 host offset, bit 0 reads-as-zero (v3);
 * with extended L2 a second u64 holds the zero (high word) and allocation (low word) bitmaps of
 * the 32 subclusters.
 */
import { corrupt, hex, INCOMPAT_EXTL2, readU64, writeU64, type Qcow2Header } from './header.js';

export const ENTRY_COPIED_HI = 0x80000000;
export const ENTRY_COMPRESSED_HI = 0x40000000;
export const ENTRY_ZERO_LO = 0x1;
const OFFSET_HI_MASK = 0x00ffffff;
const OFFSET_LO_MASK = 0xfffffe00;
export const L1_RESERVED_HI = 0x7f000000;
export const L1_RESERVED_LO = 0x1ff;
/** Standard L2 descriptor bits that must be zero (bits 1..8 and 56..61; bit 0 is the zero flag). */
export const L2_RESERVED_HI = 0x3f000000;
export const L2_RESERVED_LO = 0x1fe;
/** Byte offsets, within an extended L2 entry, of its subcluster bitmaps. */
export const L2_ZERO_BITS = 8;
export const L2_ALLOC_BITS = 12;
/** Every subcluster. */
export const ALL_UNITS = 0xffffffff;

/** Host offset (bits 9..55) of a standard L1/L2 entry given as words. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI_MASK) * 2 ** 32 + ((lo & OFFSET_LO_MASK) >>> 0);
}

/** Writes a standard entry (offset | flags) as two big-endian words at `at`. */
export function writeEntry(buf: Buffer, at: number, offset: number, copied: boolean, zero: boolean): void {
  buf.writeUInt32BE(((copied ? ENTRY_COPIED_HI : 0) | Math.floor(offset / 2 ** 32)) >>> 0, at);
  buf.writeUInt32BE(((offset >>> 0) | (zero ? ENTRY_ZERO_LO : 0)) >>> 0, at + 4);
}

/** Bits su..eu-1 of a 32-bit subcluster bitmap. */
export function unitMask(su: number, eu: number): number {
  return eu - su >= 32 ? ALL_UNITS : ((((1 << (eu - su)) - 1) << su) >>> 0);
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
 * Writes the compressed descriptor of a stream of `length` bytes at host byte `offset` into the
 * 8 bytes at `at` (the inverse of `decodeCompressed`; the sector count covers the stream's last
 * byte, as qemu counts it). Throws RangeError where the fields cannot hold it.
 */
export function encodeCompressed(buf: Buffer, at: number, offset: number, length: number, clusterBits: number): void {
  const hiOffsetBits = 62 - (clusterBits - 8) - 32;
  const sectors = Math.floor(((offset % 512) + length - 1) / 512);
  if (length <= 0 || sectors >= 2 ** (clusterBits - 8) || offset >= 2 ** (32 + hiOffsetBits)) {
    throw new RangeError(`compressed stream of ${length} bytes at ${offset} does not fit a descriptor`);
  }
  buf.writeUInt32BE((ENTRY_COMPRESSED_HI | (sectors << hiOffsetBits) | Math.floor(offset / 2 ** 32)) >>> 0, at);
  buf.writeUInt32BE(offset >>> 0, at + 4);
}

/** Where entry `index` of a sub-byte width (orders 0..2: 1, 2 or 4 bits) sits: LSB first within its byte. */
function subByte(index: number, order: number): { byte: number; shift: number; mask: number } {
  const bits = 1 << order;
  const perByte = 8 >> order;
  const shift = (index % perByte) * bits;
  return { byte: Math.floor(index / perByte), shift, mask: ((1 << bits) - 1) << shift };
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
      const { byte, shift, mask } = subByte(index, order);
      return (block[byte]! & mask) >> shift;
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
      const { byte, shift, mask } = subByte(index, order);
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

/** Reads the 8-byte refcount table entries into offsets, checking each is a sane block address. */
export function decodeRefcountTable(buf: Buffer, clusterSize: number, fileLength: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < buf.length; i += 8) {
    const off = readU64(buf, i, 'refcount table entry');
    if (off % clusterSize !== 0) throw corrupt(`refcount table entry ${i / 8} (${hex(off)}) is not cluster aligned`);
    if (off !== 0 && off + clusterSize > fileLength) throw corrupt(`refcount block ${i / 8} at ${hex(off)} lies past the end of the file`);
    out.push(off);
  }
  return out;
}

/** Validates the L1 table at open: reserved bits clear, L2 offsets aligned and inside the file. */
export function checkL1(l1: Buffer, clusterSize: number, fileLength: number): number[] {
  const tables: number[] = [];
  for (let i = 0; i < l1.length; i += 8) {
    const hi = l1.readUInt32BE(i);
    const lo = l1.readUInt32BE(i + 4);
    if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) throw corrupt(`L1 entry ${i / 8} has reserved bits set`);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (off % clusterSize !== 0) throw corrupt(`L1 entry ${i / 8}: L2 table offset ${hex(off)} is not cluster aligned`);
    if (off + clusterSize > fileLength) throw corrupt(`L1 entry ${i / 8}: L2 table at ${hex(off)} lies past the end of the file (${fileLength} bytes)`);
    tables.push(off);
  }
  return tables;
}
