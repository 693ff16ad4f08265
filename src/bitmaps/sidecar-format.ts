/**
 * The bitmap sidecar file (for raw images and remote backends): a pure codec for its header and
 * directory. The file is documented in docs/sidecar.md; all integers are big-endian, as in qcow2.
 *
 * Header, 64 bytes at offset 0:
 *
 *    0  8  magic "NBDDBMAP"
 *    8  4  version (1)
 *   12  4  header_length (64)
 *   16  8  disk_size: virtual size in bytes the bitmaps cover
 *   24  4  nb_bitmaps
 *   28  4  directory_length in bytes
 *   32  8  directory_offset (64: the directory follows the header)
 *   40  4  directory_crc32 (zlib CRC-32 of the directory bytes)
 *   44  4  header_crc32 (CRC-32 of bytes 0..63 with this field zero)
 *   48 16  reserved, zero
 *
 * Directory entry, 24 bytes + name, zero-padded to a multiple of 8:
 *
 *    0  8  data_offset: where the bits are, a multiple of DATA_ALIGN
 *    8  4  data_length = ceil(ceil(disk_size / granularity) / 8)
 *   12  4  flags: bit 0 enabled (records writes, qcow2's "auto"); other bits reserved, zero
 *   16  1  granularity_bits (9..31)
 *   17  1  reserved, zero
 *   18  2  name_length (1..MAX_NAME_BYTES)
 *   20  4  reserved, zero
 *   24  n  name, UTF-8, no NUL
 *
 * Bit data: data_length bytes at data_offset, LSB-first (granule 8j+i = bit i of byte j), the
 * same layout as qcow2 bitmap clusters. Data is updated in place (write-intent); the header and
 * directory are replaced only by writing a whole new file and renaming it over the old one.
 */
import { lazyBuiltin } from '../core/lazy-builtin.js';
import { Errno, NbddError } from '../core/errors.js';
import { BITMAP_LIMITS, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS } from './dirty-bitmap.js';
import type { BitmapMeta } from './store.js';

/** `node:zlib`, loaded with the first sidecar file read or written. */
const nodeZlib = lazyBuiltin<typeof import('node:zlib')>('node:zlib');
const crc32 = (buf: Uint8Array): number => nodeZlib().crc32(buf);

export const SIDECAR_MAGIC = Buffer.from('NBDDBMAP', 'latin1');
export const SIDECAR_VERSION = 1;
export const HEADER_LENGTH = 64;
export const DIR_ENTRY_FIXED = 24;
/** Bit data areas start on 4 KiB boundaries so in-place writes stay within their own sectors. */
export const DATA_ALIGN = 4096;
export const MAX_NAME_BYTES = BITMAP_LIMITS.maxNameBytes;
export const MAX_BITMAPS = BITMAP_LIMITS.maxBitmaps;
/** Largest bit data of one bitmap. */
export const MAX_DATA_LENGTH = BITMAP_LIMITS.maxDataBytes;
export const MAX_DIRECTORY_LENGTH = MAX_BITMAPS * (DIR_ENTRY_FIXED + MAX_NAME_BYTES + 8);

const FLAG_ENABLED = 1;

export interface SidecarHeader {
  diskSize: number;
  nbBitmaps: number;
  directoryLength: number;
  directoryOffset: number;
  directoryCrc: number;
}

export interface SidecarEntry extends BitmapMeta {
  dataOffset: number;
  dataLength: number;
}

function corrupt(what: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `bitmap sidecar file: ${what}`);
}

export function dataLengthFor(diskSize: number, granularity: number): number {
  return Math.ceil(Math.ceil(diskSize / granularity) / 8);
}

export function encodeHeader(h: SidecarHeader): Buffer {
  const b = Buffer.alloc(HEADER_LENGTH);
  SIDECAR_MAGIC.copy(b, 0);
  b.writeUInt32BE(SIDECAR_VERSION, 8);
  b.writeUInt32BE(HEADER_LENGTH, 12);
  b.writeBigUInt64BE(BigInt(h.diskSize), 16);
  b.writeUInt32BE(h.nbBitmaps, 24);
  b.writeUInt32BE(h.directoryLength, 28);
  b.writeBigUInt64BE(BigInt(h.directoryOffset), 32);
  b.writeUInt32BE(h.directoryCrc, 40);
  b.writeUInt32BE(crc32(b), 44);
  return b;
}

/** Decodes and checks a header. Throws EUCLEAN on anything malformed, ENOTSUP on a newer version. */
export function decodeHeader(b: Buffer): SidecarHeader {
  if (b.length < HEADER_LENGTH) throw corrupt(`header truncated (${b.length} bytes)`);
  if (!b.subarray(0, 8).equals(SIDECAR_MAGIC)) throw corrupt('bad magic');
  const version = b.readUInt32BE(8);
  if (version !== SIDECAR_VERSION) throw new NbddError(Errno.ENOTSUP, `bitmap sidecar file version ${version} is not supported`);
  if (b.readUInt32BE(12) !== HEADER_LENGTH) throw corrupt(`header_length ${b.readUInt32BE(12)}`);
  const copy = Buffer.from(b.subarray(0, HEADER_LENGTH));
  const stored = copy.readUInt32BE(44);
  copy.writeUInt32BE(0, 44);
  if (crc32(copy) !== stored) throw corrupt('header checksum mismatch');
  const diskSize = Number(b.readBigUInt64BE(16));
  const directoryOffset = Number(b.readBigUInt64BE(32));
  const h: SidecarHeader = {
    diskSize,
    nbBitmaps: b.readUInt32BE(24),
    directoryLength: b.readUInt32BE(28),
    directoryOffset,
    directoryCrc: b.readUInt32BE(40),
  };
  if (!Number.isSafeInteger(diskSize)) throw corrupt(`disk_size ${b.readBigUInt64BE(16)} too large`);
  if (h.nbBitmaps > MAX_BITMAPS) throw corrupt(`${h.nbBitmaps} bitmaps (limit ${MAX_BITMAPS})`);
  if (h.directoryLength > MAX_DIRECTORY_LENGTH) throw corrupt(`directory_length ${h.directoryLength}`);
  if (directoryOffset !== HEADER_LENGTH) throw corrupt(`directory_offset ${directoryOffset}`);
  return h;
}

function paddedEntryLength(nameBytes: number): number {
  return Math.ceil((DIR_ENTRY_FIXED + nameBytes) / 8) * 8;
}

export function encodeDirectory(entries: SidecarEntry[]): Buffer {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  const out = Buffer.alloc(names.reduce((n, name) => n + paddedEntryLength(name.length), 0));
  let at = 0;
  entries.forEach((e, i) => {
    const name = names[i]!;
    out.writeBigUInt64BE(BigInt(e.dataOffset), at);
    out.writeUInt32BE(e.dataLength, at + 8);
    out.writeUInt32BE(e.enabled ? FLAG_ENABLED : 0, at + 12);
    out.writeUInt8(Math.log2(e.granularity), at + 16);
    out.writeUInt16BE(name.length, at + 18);
    name.copy(out, at + DIR_ENTRY_FIXED);
    at += paddedEntryLength(name.length);
  });
  return out;
}

/**
 * Decodes `h.nbBitmaps` entries from `dir` and checks each against the header and the file length:
 * names unique and valid UTF-8, granularity in range, data length matching the disk size, data
 * areas aligned, inside the file and not overlapping the directory or each other.
 */
export function decodeDirectory(dir: Buffer, h: SidecarHeader, fileLength: number): SidecarEntry[] {
  if (dir.length !== h.directoryLength) throw corrupt('directory truncated');
  if (crc32(dir) !== h.directoryCrc) throw corrupt('directory checksum mismatch');
  const entries: SidecarEntry[] = [];
  const seen = new Set<string>();
  let at = 0;
  for (let i = 0; i < h.nbBitmaps; i++) {
    if (at + DIR_ENTRY_FIXED > dir.length) throw corrupt(`directory entry ${i} truncated`);
    const dataOffset = Number(dir.readBigUInt64BE(at));
    const dataLength = dir.readUInt32BE(at + 8);
    const flags = dir.readUInt32BE(at + 12);
    const gBits = dir.readUInt8(at + 16);
    const nameLength = dir.readUInt16BE(at + 18);
    if (flags & ~FLAG_ENABLED) throw corrupt(`entry ${i}: unknown flags 0x${flags.toString(16)}`);
    if (gBits < MIN_GRANULARITY_BITS || gBits > MAX_GRANULARITY_BITS) throw corrupt(`entry ${i}: granularity_bits ${gBits}`);
    if (nameLength === 0 || nameLength > MAX_NAME_BYTES) throw corrupt(`entry ${i}: name_length ${nameLength}`);
    if (at + DIR_ENTRY_FIXED + nameLength > dir.length) throw corrupt(`entry ${i}: name runs past the directory`);
    const rawName = dir.subarray(at + DIR_ENTRY_FIXED, at + DIR_ENTRY_FIXED + nameLength);
    const name = rawName.toString('utf8');
    if (!Buffer.from(name, 'utf8').equals(rawName) || name.includes('\0')) throw corrupt(`entry ${i}: name is not valid UTF-8`);
    if (seen.has(name)) throw corrupt(`bitmap '${name}' appears twice`);
    seen.add(name);
    const granularity = 2 ** gBits;
    if (dataLength !== dataLengthFor(h.diskSize, granularity)) throw corrupt(`bitmap '${name}': data_length ${dataLength} does not match the disk size`);
    if (dataOffset % DATA_ALIGN !== 0 || dataOffset < HEADER_LENGTH + h.directoryLength || dataOffset + dataLength > fileLength) {
      throw corrupt(`bitmap '${name}': data area at ${dataOffset} (+${dataLength}) is misplaced`);
    }
    entries.push({ name, granularity, enabled: (flags & FLAG_ENABLED) !== 0, dataOffset, dataLength });
    at += paddedEntryLength(nameLength);
  }
  if (at !== dir.length) throw corrupt('trailing bytes after the directory');
  const sorted = [...entries].sort((a, b) => a.dataOffset - b.dataOffset);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i - 1]!.dataOffset + sorted[i - 1]!.dataLength > sorted[i]!.dataOffset) throw corrupt(`bitmaps '${sorted[i - 1]!.name}' and '${sorted[i]!.name}' overlap`);
  }
  return entries;
}

/**
 * Lays out a file for `metas`: header, directory, then one aligned data area per bitmap.
 * Returns the header and entries (with data offsets) to encode.
 */
export function layoutSidecar(diskSize: number, metas: BitmapMeta[]): { header: SidecarHeader; entries: SidecarEntry[]; directory: Buffer; fileLength: number } {
  const placeholder = metas.map((m) => ({ ...m, dataOffset: 0, dataLength: dataLengthFor(diskSize, m.granularity) }));
  const directoryLength = encodeDirectory(placeholder).length;
  let at = Math.ceil((HEADER_LENGTH + directoryLength) / DATA_ALIGN) * DATA_ALIGN;
  const entries = placeholder.map((e) => {
    const placed = { ...e, dataOffset: at };
    at += Math.ceil(e.dataLength / DATA_ALIGN) * DATA_ALIGN;
    return placed;
  });
  const directory = encodeDirectory(entries);
  const header: SidecarHeader = { diskSize, nbBitmaps: entries.length, directoryLength, directoryOffset: HEADER_LENGTH, directoryCrc: crc32(directory) };
  return { header, entries, directory, fileLength: at };
}
