/**
 * The one codec of the qcow2 bitmaps extension (qemu docs/interop/qcow2.rst, "Bitmaps
 * extension"; QEMU block/qcow2.c and block/qcow2-bitmap.c for the limits): the extension data,
 * the bitmap directory, bitmap tables and data clusters. No I/O: callers read the bytes and hand
 * them in. All integers are big-endian.
 *
 * Used at open (the extension), by `nbdd info` (the directory as it is), and by the in-image
 * bitmap store src/bitmaps/store-qcow2.ts (the directory checked as QEMU checks it before trusting
 * it, tables, data).
 */
import { BITMAP_LIMITS, DirtyBitmap, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS } from '../../../bitmaps/dirty-bitmap.js';
import { corrupt, readU64 } from './header.js';

export const BITMAPS_EXT_LENGTH = 24;
export const BITMAP_IN_USE = 1 << 0;
export const BITMAP_AUTO = 1 << 1;
/** The only flags QEMU accepts (extra_data_compatible is refused along with extra data). */
export const BITMAP_KNOWN_FLAGS = BITMAP_IN_USE | BITMAP_AUTO;
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
export const DIR_ENTRY_FIXED = 24;
/** QEMU limits (see BITMAP_LIMITS; BME_MAX_TABLE_SIZE, QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
export const MAX_BITMAP_NAME = BITMAP_LIMITS.maxNameBytes;
export const MAX_BITMAPS = BITMAP_LIMITS.maxBitmaps;
export const MAX_TABLE_ENTRIES = 0x8000000;
export const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;

/* Bitmap table entry: bits 9-55 data cluster offset; with offset 0, bit 0 = all ones. */
const TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
const TABLE_RESERVED_MASK = 0xff000000000001fen;

/**
 * Bitmaps extension data (24 bytes):
 *
 *    0  4  nb_bitmaps (≥ 1)
 *    4  4  reserved, zero
 *    8  8  bitmap_directory_size (bytes)
 *   16  8  bitmap_directory_offset (cluster aligned)
 */
export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export function encodeBitmapsExtension(e: BitmapsExtension): Buffer {
  const b = Buffer.alloc(BITMAPS_EXT_LENGTH);
  b.writeUInt32BE(e.nbBitmaps, 0);
  b.writeBigUInt64BE(BigInt(e.directorySize), 8);
  b.writeBigUInt64BE(BigInt(e.directoryOffset), 16);
  return b;
}

export function decodeBitmapsExtension(b: Buffer, clusterSize: number): BitmapsExtension {
  if (b.length !== BITMAPS_EXT_LENGTH) throw corrupt(`bitmaps extension of ${b.length} bytes (expected ${BITMAPS_EXT_LENGTH})`);
  const e = { nbBitmaps: b.readUInt32BE(0), directorySize: readU64(b, 8, 'bitmap_directory_size'), directoryOffset: readU64(b, 16, 'bitmap_directory_offset') };
  if (b.readUInt32BE(4) !== 0) throw corrupt('bitmaps extension reserved field is not zero');
  if (e.nbBitmaps === 0 || e.nbBitmaps > MAX_BITMAPS) throw corrupt(`bitmaps extension with nb_bitmaps ${e.nbBitmaps} (1..${MAX_BITMAPS})`);
  if (e.directorySize > MAX_DIRECTORY_BYTES || e.directorySize < e.nbBitmaps * DIR_ENTRY_FIXED) throw corrupt(`bitmap directory size ${e.directorySize}`);
  if (e.directoryOffset % clusterSize !== 0) throw corrupt(`bitmap directory offset ${e.directoryOffset} is not cluster aligned`);
  return e;
}

/**
 * Bitmap directory entry, 24 bytes + extra data + name, zero-padded to a multiple of 8:
 *
 *    0  8  bitmap_table_offset (cluster aligned)
 *    8  4  bitmap_table_size (entries)
 *   12  4  flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
 *   16  1  type (1: dirty tracking)
 *   17  1  granularity_bits (QEMU: 9..31)
 *   18  2  name_size (1..1023)
 *   20  4  extra_data_size
 *   24  …  extra data, then the name (UTF-8, no NUL)
 */
export interface Qcow2BitmapEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  name: string;
}

/** An entry as stored, before it is trusted (type and extra data included). */
export interface BitmapDirectoryEntry extends Qcow2BitmapEntry {
  type: number;
  extraDataSize: number;
}

/** What the directory is checked against before its bitmaps are trusted. */
export interface DirectoryChecks {
  diskSize: number;
  clusterSize: number;
  fileLength: number;
}

/**
 * Decodes `count` entries. With `checks`, checks each as QEMU does before trusting it — type 1,
 * known flags, no extra data, granularity in range, table size matching the disk, table inside
 * the file, names unique — as the bitmap store needs; without, only the framing (for `nbdd info`,
 * which shows what is there). Throws EUCLEAN.
 */
export function decodeBitmapDirectory(dir: Buffer, count: number, checks?: DirectoryChecks): BitmapDirectoryEntry[] {
  const out: BitmapDirectoryEntry[] = [];
  const names = new Set<string>();
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + DIR_ENTRY_FIXED > dir.length) throw corrupt(`bitmap directory truncated at entry ${i}`);
    const nameSize = dir.readUInt16BE(at + 18);
    const extraDataSize = dir.readUInt32BE(at + 20);
    // A trusted entry has no extra data (QEMU refuses it), so it cannot move the name either.
    if (checks && extraDataSize !== 0) throw corrupt(`bitmap ${i} has ${extraDataSize} bytes of extra data`);
    if (nameSize === 0 || nameSize > MAX_BITMAP_NAME) throw corrupt(`bitmap ${i} name size ${nameSize}`);
    const nameStart = at + DIR_ENTRY_FIXED + extraDataSize;
    if (nameStart + nameSize > dir.length) throw corrupt(`bitmap directory entry ${i} runs past the directory`);
    const e: BitmapDirectoryEntry = {
      tableOffset: readU64(dir, at, 'bitmap_table_offset'),
      tableSize: dir.readUInt32BE(at + 8),
      flags: dir.readUInt32BE(at + 12),
      type: dir[at + 16]!,
      granularityBits: dir[at + 17]!,
      extraDataSize,
      name: dir.subarray(nameStart, nameStart + nameSize).toString('utf8'),
    };
    if (checks) {
      checkEntry(e, checks);
      if (names.has(e.name)) throw corrupt(`bitmap '${e.name}' appears twice`);
      names.add(e.name);
    }
    out.push(e);
    at = Math.ceil((nameStart + nameSize) / 8) * 8;
  }
  return out;
}

function checkEntry(e: BitmapDirectoryEntry, g: DirectoryChecks): void {
  const { name, type, flags, granularityBits, tableSize, tableOffset } = e;
  if (type !== BITMAP_TYPE_DIRTY_TRACKING) throw corrupt(`bitmap '${name}' has type ${type}`);
  if (flags & ~BITMAP_KNOWN_FLAGS) throw corrupt(`bitmap '${name}' has unknown flags 0x${flags.toString(16)}`);
  if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS) throw corrupt(`bitmap '${name}' granularity_bits ${granularityBits}`);
  if (tableSize !== tableSizeFor(g.diskSize, 2 ** granularityBits, g.clusterSize)) throw corrupt(`bitmap '${name}' table size ${tableSize} does not match the disk`);
  if (tableSize > MAX_TABLE_ENTRIES || tableOffset % g.clusterSize !== 0 || tableOffset + tableSize * 8 > g.fileLength) {
    throw corrupt(`bitmap '${name}' table at ${tableOffset} (${tableSize} entries) is misplaced`);
  }
}

export function encodeBitmapDirectory(entries: Qcow2BitmapEntry[]): Buffer {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  const out = Buffer.alloc(names.reduce((n, name) => n + Math.ceil((DIR_ENTRY_FIXED + name.length) / 8) * 8, 0));
  let at = 0;
  entries.forEach((e, i) => {
    const name = names[i]!;
    out.writeBigUInt64BE(BigInt(e.tableOffset), at);
    out.writeUInt32BE(e.tableSize, at + 8);
    out.writeUInt32BE(e.flags, at + 12);
    out[at + 16] = BITMAP_TYPE_DIRTY_TRACKING;
    out[at + 17] = e.granularityBits;
    out.writeUInt16BE(name.length, at + 18);
    name.copy(out, at + DIR_ENTRY_FIXED);
    at += Math.ceil((DIR_ENTRY_FIXED + name.length) / 8) * 8;
  });
  return out;
}

/** Entries of a bitmap table: `ceil(ceil(diskSize / g) / 8 / clusterSize)`. */
export function tableSizeFor(diskSize: number, granularity: number, clusterSize: number): number {
  return Math.ceil(Math.ceil(Math.ceil(diskSize / granularity) / 8) / clusterSize);
}

/** One table entry: a data cluster, or no cluster with all bits 0 or all bits 1. */
export type TableEntry = { kind: 'zeros' } | { kind: 'ones' } | { kind: 'data'; offset: number };

export function decodeBitmapTable(buf: Buffer, size: number, clusterSize: number, fileLength: number): TableEntry[] {
  if (buf.length < size * 8) throw corrupt('bitmap table truncated');
  const out: TableEntry[] = [];
  for (let i = 0; i < size; i++) {
    const v = buf.readBigUInt64BE(i * 8);
    if (v & TABLE_RESERVED_MASK) throw corrupt(`bitmap table entry ${i} has reserved bits set (0x${v.toString(16)})`);
    const offset = Number(v & TABLE_OFFSET_MASK);
    if (offset === 0) out.push(v & 1n ? { kind: 'ones' } : { kind: 'zeros' });
    else {
      if (v & 1n) throw corrupt(`bitmap table entry ${i}: all-ones flag with a data cluster`);
      if (offset % clusterSize !== 0 || offset + clusterSize > fileLength) throw corrupt(`bitmap table entry ${i}: data cluster at ${offset} is misplaced`);
      out.push({ kind: 'data', offset });
    }
  }
  return out;
}

export function encodeBitmapTable(entries: TableEntry[]): Buffer {
  const out = Buffer.alloc(entries.length * 8);
  entries.forEach((e, i) => out.writeBigUInt64BE(e.kind === 'data' ? BigInt(e.offset) : e.kind === 'ones' ? 1n : 0n, i * 8));
  return out;
}

/**
 * Fills `bits` from a decoded table: entry i holds serialized bytes [i*clusterSize, (i+1)*clusterSize).
 * `readCluster` returns the data cluster at a host offset (at least `clusterSize` bytes).
 */
export async function loadBitmapData(bits: DirtyBitmap, table: TableEntry[], clusterSize: number, readCluster: (offset: number) => Promise<Buffer>): Promise<void> {
  bits.clear();
  for (let i = 0; i < table.length; i++) {
    const e = table[i]!;
    if (e.kind === 'zeros') continue;
    const from = i * clusterSize;
    const n = Math.min(clusterSize, bits.byteLength - from);
    if (n <= 0) break;
    const chunk = e.kind === 'ones' ? Buffer.alloc(n, 0xff) : (await readCluster(e.offset)).subarray(0, n);
    bits.load(chunk, from);
  }
}

/** Table index i of `bits`: its serialized bytes for cluster i, or null when they are all zero. */
export function bitmapDataCluster(bits: DirtyBitmap, i: number, clusterSize: number): Buffer | null {
  const view = bits.view(i * clusterSize, Math.min((i + 1) * clusterSize, bits.byteLength));
  if (view.every((b) => b === 0)) return null;
  const out = Buffer.alloc(clusterSize);
  out.set(view);
  return out;
}
