/**
 * A generator of damaged qcow2 images: a few healthy base images built with qemu-img/qemu-io
 * (`makeBases`), and a table of named mutations (`CASES`), each a few lines that edit the bytes of
 * a copy of one base. Everything is deterministic and built at test time; nothing but this code is
 * stored. The layout of a base is parsed from its bytes (`parse`), so a mutation says what it hits
 * ("the first L2 table", "the refcount block") rather than an offset.
 *
 * Field offsets and bit layouts: qemu docs/interop/qcow2.rst (summarised in docs/qcow2.md). This
 * file deliberately does not import the engine's codecs: the damage must not depend on the code
 * under test.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { prng } from './prng.js';
import { qemuCreate, qemuIo } from './qemu.js';
import { run } from './tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/* ------------------------------------------------------------------ bytes */

/** Header field offsets (u32 unless noted). */
export const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8, // u64
  backingFileSize: 16,
  clusterBits: 20,
  size: 24, // u64
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40, // u64
  refcountTableOffset: 48, // u64
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64, // u64
  incompatible: 72, // u64
  compatible: 80, // u64
  autoclear: 88, // u64
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104, // u8
} as const;

export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;
export const ZERO = 1n;
export const OFFSET_MASK = 0x00fffffffffffe00n;

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_FDE = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const r32 = (b: Buffer, at: number): number => b.readUInt32BE(at);
export const w32 = (b: Buffer, at: number, v: number): void => void b.writeUInt32BE(v >>> 0, at);
export const r64 = (b: Buffer, at: number): bigint => b.readBigUInt64BE(at);
export const w64 = (b: Buffer, at: number, v: bigint | number): void => void b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(v)), at);
const big = (n: number): bigint => BigInt(n);
const roundUp = (n: number, m: number): number => Math.ceil(n / m) * m;

/* ------------------------------------------------------------------ layout */

export interface L2Entry {
  /** Guest offset of the cluster. */
  guest: number;
  /** File offset of the entry. */
  at: number;
  value: bigint;
  /** Host offset (bits 9..55; for compressed entries the descriptor's host byte offset). */
  host: number;
  /** Extended L2: the zero and allocation bitmaps. */
  zeroBits: number;
  allocBits: number;
  /** Compressed entries: additional 512-byte sectors. */
  sectors: number;
}

export interface Extension {
  type: number;
  /** File offset of the extension header. */
  at: number;
  length: number;
  data: Buffer;
}

export interface BitmapEntry {
  /** File offset of the directory entry. */
  at: number;
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  nameSize: number;
  extraDataSize: number;
  name: string;
  /** Table entries as stored. */
  table: bigint[];
}

export interface Layout {
  fileLength: number;
  version: number;
  clusterBits: number;
  cs: number;
  size: number;
  headerLength: number;
  extL2: boolean;
  l2EntrySize: number;
  l1Offset: number;
  l1Size: number;
  rtOffset: number;
  rtClusters: number;
  refcountOrder: number;
  /** L2 table offset per L1 index (0: none). */
  l2: number[];
  /** Entries with a normal host cluster (data, or zero flag with an offset). */
  data: L2Entry[];
  compressed: L2Entry[];
  /** Entries with the zero flag (v3, standard L2). */
  zero: L2Entry[];
  /** Refcount block offset per refcount table index (0: none). */
  refBlocks: number[];
  exts: Extension[];
  /** File offset of the end-of-extensions marker (-1 when there is none). */
  extEnd: number;
  backing: { at: number; size: number; name: string } | null;
  bitmaps: { extAt: number; nb: number; dirSize: number; dirOffset: number; entries: BitmapEntry[] } | null;
}

/** Parses a healthy image. */
export function parse(b: Buffer): Layout {
  const version = r32(b, H.version);
  const clusterBits = r32(b, H.clusterBits);
  const cs = 2 ** clusterBits;
  const v3 = version >= 3;
  const incompatible = v3 ? r64(b, H.incompatible) : 0n;
  const extL2 = (incompatible & 16n) !== 0n;
  const l2EntrySize = extL2 ? 16 : 8;
  const L: Layout = {
    fileLength: b.length,
    version,
    clusterBits,
    cs,
    size: Number(r64(b, H.size)),
    headerLength: v3 ? r32(b, H.headerLength) : 72,
    extL2,
    l2EntrySize,
    l1Offset: Number(r64(b, H.l1TableOffset)),
    l1Size: r32(b, H.l1Size),
    rtOffset: Number(r64(b, H.refcountTableOffset)),
    rtClusters: r32(b, H.refcountTableClusters),
    refcountOrder: v3 ? r32(b, H.refcountOrder) : 4,
    l2: [],
    data: [],
    compressed: [],
    zero: [],
    refBlocks: [],
    exts: [],
    extEnd: -1,
    backing: null,
    bitmaps: null,
  };
  const perTable = cs / l2EntrySize;
  for (let i = 0; i < L.l1Size; i++) {
    const t = Number(r64(b, L.l1Offset + 8 * i) & OFFSET_MASK);
    L.l2.push(t);
    if (t === 0) continue;
    for (let j = 0; j < perTable; j++) {
      const at = t + j * l2EntrySize;
      const value = r64(b, at);
      const e: L2Entry = { guest: (i * perTable + j) * cs, at, value, host: Number(value & OFFSET_MASK), zeroBits: 0, allocBits: 0, sectors: 0 };
      if (extL2) {
        e.zeroBits = r32(b, at + 8);
        e.allocBits = r32(b, at + 12);
      }
      if (value & COMPRESSED) {
        Object.assign(e, decodeCompressed(value, clusterBits));
        L.compressed.push(e);
        continue;
      }
      if (!extL2 && v3 && value & ZERO) L.zero.push(e);
      if (e.host !== 0) L.data.push(e);
    }
  }
  for (let i = 0; i < (L.rtClusters * cs) / 8 && L.rtOffset + 8 * i + 8 <= b.length; i++) L.refBlocks.push(Number(r64(b, L.rtOffset + 8 * i)));
  const backingAt = Number(r64(b, H.backingFileOffset));
  const backingSize = r32(b, H.backingFileSize);
  if (backingAt && backingSize) L.backing = { at: backingAt, size: backingSize, name: b.toString('utf8', backingAt, backingAt + backingSize) };
  const limit = backingAt ? backingAt : cs;
  for (let at = L.headerLength; at + 8 <= limit; ) {
    const type = r32(b, at);
    const length = r32(b, at + 4);
    if (type === EXT_END) {
      L.extEnd = at;
      break;
    }
    L.exts.push({ type, at, length, data: Buffer.from(b.subarray(at + 8, at + 8 + length)) });
    at += 8 + roundUp(length, 8);
  }
  const bm = L.exts.find((e) => e.type === EXT_BITMAPS);
  if (bm) {
    const nb = r32(bm.data, 0);
    const dirSize = Number(r64(bm.data, 8));
    const dirOffset = Number(r64(bm.data, 16));
    const entries: BitmapEntry[] = [];
    for (let i = 0, at = dirOffset; i < nb; i++) {
      const nameSize = b.readUInt16BE(at + 18);
      const extraDataSize = r32(b, at + 20);
      const e: BitmapEntry = {
        at,
        tableOffset: Number(r64(b, at)),
        tableSize: r32(b, at + 8),
        flags: r32(b, at + 12),
        type: b[at + 16]!,
        granularityBits: b[at + 17]!,
        nameSize,
        extraDataSize,
        name: b.toString('utf8', at + 24 + extraDataSize, at + 24 + extraDataSize + nameSize),
        table: [],
      };
      for (let k = 0; k < e.tableSize; k++) e.table.push(r64(b, e.tableOffset + 8 * k));
      entries.push(e);
      at += roundUp(24 + extraDataSize + nameSize, 8);
    }
    L.bitmaps = { extAt: bm.at, nb, dirSize, dirOffset, entries };
  }
  return L;
}

/* ------------------------------------------------------------------ entry codecs and refcounts */

/** Compressed descriptor, x = 62 - (cluster_bits - 8): bits 0..x-1 host offset, x..61 extra sectors. */
export function decodeCompressed(v: bigint, clusterBits: number): { host: number; sectors: number } {
  const x = big(62 - (clusterBits - 8));
  return { host: Number(v & ((1n << x) - 1n)), sectors: Number((v >> x) & ((1n << (62n - x)) - 1n)) };
}

export function encodeCompressed(host: number | bigint, sectors: number, clusterBits: number, flags = COMPRESSED): bigint {
  const x = big(62 - (clusterBits - 8));
  return flags | (big(sectors) << x) | BigInt(host);
}

function refSlot(L: Layout, cluster: number): { block: number; index: number } {
  const perBlock = (L.cs * 8) >> L.refcountOrder;
  const block = L.refBlocks[Math.floor(cluster / perBlock)];
  if (!block) throw new Error(`damage: no refcount block covers cluster ${cluster}`);
  return { block, index: cluster % perBlock };
}

export function getRef(b: Buffer, L: Layout, cluster: number): bigint {
  const { block, index } = refSlot(L, cluster);
  const bits = 1 << L.refcountOrder;
  if (bits < 8) return big((b[block + Math.floor((index * bits) / 8)]! >> ((index * bits) % 8)) & ((1 << bits) - 1));
  const at = block + (index * bits) / 8;
  return bits === 8 ? big(b[at]!) : bits === 16 ? big(b.readUInt16BE(at)) : bits === 32 ? big(r32(b, at)) : r64(b, at);
}

/** Sets the refcount of host cluster `cluster` (truncated to the width). */
export function setRef(b: Buffer, L: Layout, cluster: number, value: bigint | number): void {
  const { block, index } = refSlot(L, cluster);
  const bits = 1 << L.refcountOrder;
  const v = BigInt.asUintN(bits, BigInt(value));
  if (bits < 8) {
    const at = block + Math.floor((index * bits) / 8);
    const shift = (index * bits) % 8;
    const mask = ((1 << bits) - 1) << shift;
    b[at] = (b[at]! & ~mask) | ((Number(v) << shift) & mask);
    return;
  }
  const at = block + (index * bits) / 8;
  if (bits === 8) b[at] = Number(v);
  else if (bits === 16) b.writeUInt16BE(Number(v), at);
  else if (bits === 32) w32(b, at, Number(v));
  else w64(b, at, v);
}

/* ------------------------------------------------------------------ shared edits */

const cl = (L: Layout, offset: number): number => Math.floor(offset / L.cs);
/** A cluster-aligned offset well past the end of the file. */
const pastEof = (L: Layout, clusters = 16): number => roundUp(L.fileLength, L.cs) + clusters * L.cs;
const l1At = (L: Layout, i = 0): number => L.l1Offset + 8 * i;
const rtAt = (L: Layout, i = 0): number => L.rtOffset + 8 * i;
/** The first L2 table, the first refcount block. */
const l2Of = (L: Layout): number => L.l2.find((t) => t !== 0)!;
const rbOf = (L: Layout): number => L.refBlocks[0]!;
/** The first entry with a normal data cluster (not a zero cluster). */
const dataOf = (L: Layout, k = 0): L2Entry => L.data.filter((e) => !(L.version >= 3 && !L.extL2 && e.value & ZERO))[k]!;
/** The L2 entry of guest cluster `guest` (it must lie in an existing table). */
function entryAt(L: Layout, guest: number): number {
  const perTable = L.cs / L.l2EntrySize;
  const ci = Math.floor(guest / L.cs);
  return L.l2[Math.floor(ci / perTable)]! + (ci % perTable) * L.l2EntrySize;
}
const setL1 = (b: Buffer, L: Layout, v: bigint | number, i = 0): void => w64(b, l1At(L, i), v);
const orEntry = (b: Buffer, at: number, bits: bigint): void => w64(b, at, r64(b, at) | bits);
const andEntry = (b: Buffer, at: number, bits: bigint): void => w64(b, at, r64(b, at) & ~bits);
const setFeature = (b: Buffer, field: number, bits: bigint): void => w64(b, field, r64(b, field) | bits);
const clearFeature = (b: Buffer, field: number, bits: bigint): void => w64(b, field, r64(b, field) & ~bits);
/** Cuts the file at `n` bytes. */
const cut = (b: Buffer, n: number): Buffer => Buffer.from(b.subarray(0, n));

/** One header extension (type, length, data, zero padding to 8). */
export function ext(type: number, data: Buffer | string, length?: number): Buffer {
  const d = typeof data === 'string' ? Buffer.from(data, 'latin1') : data;
  const out = Buffer.alloc(8 + roundUp(d.length, 8));
  w32(out, 0, type);
  w32(out, 4, length ?? d.length);
  d.copy(out, 8);
  return out;
}

/**
 * Rewrites the extension area: `area` (encoded extensions; the end marker is appended unless
 * `end` is false), then the backing file name right after (backing_file_offset updated), the rest
 * of the first cluster zeroed.
 */
function setArea(b: Buffer, L: Layout, area: Buffer[], end = true): void {
  const name = L.backing ? Buffer.from(b.subarray(L.backing.at, L.backing.at + L.backing.size)) : null;
  const bytes = Buffer.concat([...area, ...(end ? [ext(EXT_END, Buffer.alloc(0))] : [])]);
  if (L.headerLength + bytes.length + (name?.length ?? 0) > L.cs) throw new Error('damage: extension area does not fit');
  b.fill(0, L.headerLength, L.cs);
  bytes.copy(b, L.headerLength);
  if (name) {
    name.copy(b, L.headerLength + bytes.length);
    w64(b, H.backingFileOffset, L.headerLength + bytes.length);
  }
}
/** The image's extensions, encoded again. */
const extsOf = (L: Layout, skip: number[] = []): Buffer[] => L.exts.filter((e) => !skip.includes(e.type)).map((e) => ext(e.type, e.data));

/** Sets the backing file name (stored right after the end marker) to `name`. */
function setBackingName(b: Buffer, L: Layout, name: Buffer | string): void {
  const bytes = typeof name === 'string' ? Buffer.from(name, 'utf8') : name;
  const at = L.backing?.at ?? L.extEnd + 8;
  b.fill(0, at, L.cs);
  bytes.copy(b, at);
  w64(b, H.backingFileOffset, at);
  w32(b, H.backingFileSize, bytes.length);
}

const bm = (L: Layout, i = 0): BitmapEntry => L.bitmaps!.entries[i]!;
/** The first data cluster of a bitmap table. */
const bmData = (L: Layout): { entryAt: number; host: number } => {
  for (const e of L.bitmaps!.entries) {
    const k = e.table.findIndex((v) => (v & OFFSET_MASK) !== 0n);
    if (k >= 0) return { entryAt: e.tableOffset + 8 * k, host: Number(e.table[k]! & OFFSET_MASK) };
  }
  throw new Error('damage: no bitmap data cluster');
};
const bmExtData = (L: Layout): number => L.bitmaps!.extAt + 8;

/* ------------------------------------------------------------------ bases */

export const BASES = ['v3', 'compressed', 'bitmap', 'backing', 'v2', 'extl2', 'c512', 'refcount1', 'refcount64', 'lazy'] as const;
export type BaseName = (typeof BASES)[number];

/** Data, zero clusters (one still allocated, one plain) and the last cluster of an 8 MiB disk. */
const STANDARD_WRITES = [
  'write -P 0x11 0 128k',
  'write -P 0x12 1028k 8k',
  'write -P 0x13 3M 64k',
  'write -P 0x14 2M 64k',
  'write -z 2M 64k',
  'write -z 5M 64k',
  'write -P 0x15 8128k 64k',
];

/** Builds the healthy base images in `dir` and returns their paths by name. */
export function makeBases(dir: string): Record<BaseName, string> {
  const p = (name: string): string => join(dir, `${name}.qcow2`);
  const out = {} as Record<BaseName, string>;
  const std = (name: BaseName, opts: string[], writes = STANDARD_WRITES, size = 8 * MiB): void => {
    qemuCreate(p(name), size, opts);
    qemuIo(p(name), writes);
    out[name] = p(name);
  };
  std('v3', []);
  std('v2', ['compat=0.10'], STANDARD_WRITES.filter((w) => !w.startsWith('write -z 5M')));
  std('extl2', ['extended_l2=on', 'cluster_size=64k'], ['write -P 0x21 0 4k', 'write -P 0x22 64k 64k', 'write -P 0x23 1030k 3k', 'write -P 0x24 2M 64k', 'write -z 2M 32k', 'write -z 3M 64k', 'write -P 0x25 8188k 4k']);
  std('c512', ['cluster_size=512'], ['write -P 0x31 0 64k', 'write -P 0x32 100k 4k', 'write -P 0x33 512k 2k', 'write -z 600k 4k', 'write -P 0x34 1020k 4k'], 1 * MiB);
  std('refcount1', ['refcount_bits=1']);
  std('refcount64', ['refcount_bits=64']);
  std('lazy', ['lazy_refcounts=on']);

  // Compressed: constant, moderately compressible and incompressible clusters (the last stay normal).
  const raw = Buffer.alloc(4 * MiB);
  raw.fill(0x41, 0, 256 * KiB);
  for (let i = 0; i < 256 * KiB; i++) raw[MiB + i] = ((i * 31) ^ (i >> 8) ^ (i >> 13)) & 0xff;
  const rnd = prng(7);
  for (let i = 0; i < 64 * KiB; i++) raw[2 * MiB + 64 * KiB + i] = Math.floor(rnd() * 256);
  raw.fill(0x43, 4 * MiB - 128 * KiB);
  writeFileSync(join(dir, 'compressed.raw'), raw);
  run('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', join(dir, 'compressed.raw'), p('compressed')]);
  out.compressed = p('compressed');

  // Bitmaps: b0 enabled (recorded the writes: a data cluster), b1 disabled with b0 merged in.
  qemuCreate(p('bitmap'), 8 * MiB);
  run('qemu-img', ['bitmap', '--add', '-g', '64k', p('bitmap'), 'b0']);
  qemuIo(p('bitmap'), ['write -P 0x51 0 128k', 'write -P 0x52 3M 64k', 'write -P 0x53 8128k 64k']);
  run('qemu-img', ['bitmap', '--add', '--disable', '-g', '128k', p('bitmap'), 'b1']);
  run('qemu-img', ['bitmap', '--merge', 'b0', p('bitmap'), 'b1']);
  out.bitmap = p('bitmap');

  // Backing: qcow2 over qcow2 (absolute name, backing format extension).
  const lower = p('backing-lower');
  qemuCreate(lower, 8 * MiB);
  qemuIo(lower, ['write -P 0x71 0 1M', 'write -P 0x72 6M 512k']);
  qemuCreate(p('backing'), 8 * MiB, [], { path: lower, format: 'qcow2' });
  qemuIo(p('backing'), ['write -P 0x81 512k 64k', 'write -P 0x82 7M 4k', 'write -z 6M 64k']);
  out.backing = p('backing');
  return out;
}

/* ------------------------------------------------------------------ cases */

export interface DamageContext {
  /** File name (no directory) the damaged image is written as (for self-references). */
  file: string;
  /** Directory it is written in. */
  dir: string;
}

export interface DamagedCase {
  /** Unique, file-name safe: `category.what`. */
  name: string;
  category: string;
  base: BaseName;
  /** Edits `buf` (a copy of the base) in place, or returns the new contents (truncation, growth). */
  apply(buf: Buffer, ctx: DamageContext): Buffer | void;
}

type Edit = (b: Buffer, L: Layout, ctx: DamageContext) => Buffer | void;
type Row = [name: string, base: BaseName, edit: Edit];

function group(category: string, rows: Row[]): DamagedCase[] {
  return rows.map(([what, base, edit]) => ({ name: `${category}.${what}`, category, base, apply: (buf, ctx) => edit(buf, parse(buf), ctx) }));
}

/** Header fields: every field out of range, zero, huge, unaligned, inconsistent. */
const header: Row[] = [
  ['magic-0', 'v3', (b) => w32(b, H.magic, 0)],
  ['magic-qfi-fa', 'v3', (b) => w32(b, H.magic, 0x514649fa)],
  ...[0, 1, 4, 0xffffffff].map((v): Row => [`version-${v}`, 'v3', (b) => w32(b, H.version, v)]),
  ['version-2-on-v3', 'v3', (b) => w32(b, H.version, 2)],
  ['version-3-on-v2', 'v2', (b) => w32(b, H.version, 3)],
  ...[0, 8, 15, 17, 22, 31, 32, 63, 0xffffffff].map((v): Row => [`cluster_bits-${v}`, 'v3', (b) => w32(b, H.clusterBits, v)]),
  ['cluster_bits-16-on-c512', 'c512', (b) => w32(b, H.clusterBits, 16)],
  ['cluster_bits-10-on-c512', 'c512', (b) => w32(b, H.clusterBits, 10)],
  ...(
    [
      ['0', 0n],
      ['1', 1n],
      ['unaligned', big(8 * MiB + 777)],
      ['512M', big(512 * MiB)],
      ['513M', big(513 * MiB)],
      ['2p53', 1n << 53n],
      ['2p62', 1n << 62n],
      ['2p63', 1n << 63n],
      ['all-ones', (1n << 64n) - 1n],
    ] as const
  ).map(([n, v]): Row => [`size-${n}`, 'v3', (b) => w64(b, H.size, v)]),
  ['size-unaligned-on-c512', 'c512', (b) => w64(b, H.size, MiB - 100)],
  ...[1, 2, 3, 0xffffffff].map((v): Row => [`crypt_method-${v}`, 'v3', (b) => w32(b, H.cryptMethod, v)]),
  ...[0, 2, 8192, 8193, 0x400000, 0x400001, 0xffffffff].map((v): Row => [`l1_size-${v}`, 'v3', (b) => w32(b, H.l1Size, v)]),
  ['l1_size-0-on-c512', 'c512', (b) => w32(b, H.l1Size, 0)],
  ['l1_size-1-on-c512', 'c512', (b) => w32(b, H.l1Size, 1)],
  ['l1_table_offset-0', 'v3', (b) => w64(b, H.l1TableOffset, 0)],
  ['l1_table_offset-unaligned', 'v3', (b, L) => w64(b, H.l1TableOffset, L.l1Offset + 512)],
  ['l1_table_offset-past-eof', 'v3', (b, L) => w64(b, H.l1TableOffset, pastEof(L))],
  ['l1_table_offset-2p55', 'v3', (b) => w64(b, H.l1TableOffset, 1n << 55n)],
  ['l1_table_offset-2p63', 'v3', (b, L) => w64(b, H.l1TableOffset, (1n << 63n) | big(L.l1Offset))],
  ['l1_table_offset-at-refcount-table', 'v3', (b, L) => w64(b, H.l1TableOffset, L.rtOffset)],
  ['l1_table_offset-at-refcount-block', 'v3', (b, L) => w64(b, H.l1TableOffset, rbOf(L))],
  ['l1_table_offset-at-l2', 'v3', (b, L) => w64(b, H.l1TableOffset, l2Of(L))],
  ['l1_table_offset-at-data', 'v3', (b, L) => w64(b, H.l1TableOffset, dataOf(L).host)],
  ['refcount_table_offset-0', 'v3', (b) => w64(b, H.refcountTableOffset, 0)],
  ['refcount_table_offset-unaligned', 'v3', (b, L) => w64(b, H.refcountTableOffset, L.rtOffset + 8)],
  ['refcount_table_offset-past-eof', 'v3', (b, L) => w64(b, H.refcountTableOffset, pastEof(L))],
  ['refcount_table_offset-2p62', 'v3', (b, L) => w64(b, H.refcountTableOffset, (1n << 62n) | big(L.rtOffset))],
  ['refcount_table_offset-at-l1', 'v3', (b, L) => w64(b, H.refcountTableOffset, L.l1Offset)],
  ['refcount_table_offset-at-l2', 'v3', (b, L) => w64(b, H.refcountTableOffset, l2Of(L))],
  ['refcount_table_offset-at-data', 'v3', (b, L) => w64(b, H.refcountTableOffset, dataOf(L).host)],
  ['refcount_table_offset-at-refcount-block', 'v3', (b, L) => w64(b, H.refcountTableOffset, rbOf(L))],
  ['nb_snapshots-1-offset-0', 'v3', (b) => w32(b, H.nbSnapshots, 1)],
  ['nb_snapshots-1-at-l2', 'v3', (b, L) => (w32(b, H.nbSnapshots, 1), w64(b, H.snapshotsOffset, l2Of(L)))],
  ['nb_snapshots-huge', 'v3', (b, L) => (w32(b, H.nbSnapshots, 0xffffffff), w64(b, H.snapshotsOffset, dataOf(L).host))],
  ['snapshots_offset-unaligned', 'v3', (b) => w64(b, H.snapshotsOffset, 4096)],
  ['snapshots_offset-past-eof', 'v3', (b, L) => (w32(b, H.nbSnapshots, 1), w64(b, H.snapshotsOffset, pastEof(L)))],
  ['incompatible-bit5', 'v3', (b) => setFeature(b, H.incompatible, 1n << 5n)],
  ['incompatible-bit63', 'v3', (b) => setFeature(b, H.incompatible, 1n << 63n)],
  ['incompatible-all-ones', 'v3', (b) => w64(b, H.incompatible, (1n << 64n) - 1n)],
  ['incompatible-data-file-bit', 'v3', (b) => setFeature(b, H.incompatible, 4n)],
  ['incompatible-compression-bit-zlib', 'v3', (b) => setFeature(b, H.incompatible, 8n)],
  ['incompatible-extl2-bit-on-standard', 'v3', (b) => setFeature(b, H.incompatible, 16n)],
  ['incompatible-extl2-bit-cleared', 'extl2', (b) => clearFeature(b, H.incompatible, 16n)],
  ['incompatible-extl2-bit-on-c512', 'c512', (b) => setFeature(b, H.incompatible, 16n)],
  ['compatible-all-ones', 'v3', (b) => w64(b, H.compatible, (1n << 64n) - 1n)],
  ['autoclear-all-ones', 'v3', (b) => w64(b, H.autoclear, (1n << 64n) - 1n)],
  ['autoclear-bitmaps-without-extension', 'v3', (b) => setFeature(b, H.autoclear, 1n)],
  ['autoclear-unknown-bit', 'v3', (b) => setFeature(b, H.autoclear, 1n << 40n)],
  ...[0, 1, 2, 3, 5, 6, 7, 0xffffffff].map((v): Row => [`refcount_order-${v}`, 'v3', (b) => w32(b, H.refcountOrder, v)]),
  ['refcount_order-4-on-refcount1', 'refcount1', (b) => w32(b, H.refcountOrder, 4)],
  ...[0, 72, 100, 104, 105, 108, 120, 0x10000, 0x10008, 0xffffffff].map((v): Row => [`header_length-${v}`, 'v3', (b) => w32(b, H.headerLength, v)]),
  ['compression_type-1-without-bit', 'v3', (b) => void (b[H.compressionType] = 1)],
  ['compression_type-zstd-on-deflate', 'compressed', (b) => ((b[H.compressionType] = 1), setFeature(b, H.incompatible, 8n))],
  ['compression_type-2', 'compressed', (b) => ((b[H.compressionType] = 2), setFeature(b, H.incompatible, 8n))],
  ['compression_type-255', 'v3', (b) => ((b[H.compressionType] = 255), setFeature(b, H.incompatible, 8n))],
];

/** The dirty and corrupt bits. */
const flags: Row[] = [
  ['dirty', 'v3', (b) => setFeature(b, H.incompatible, 1n)],
  ['corrupt', 'v3', (b) => setFeature(b, H.incompatible, 2n)],
  ['dirty-and-corrupt', 'v3', (b) => setFeature(b, H.incompatible, 3n)],
  ['dirty-lazy', 'lazy', (b) => setFeature(b, H.incompatible, 1n)],
  ['dirty-lazy-refcount-0', 'lazy', (b, L) => (setFeature(b, H.incompatible, 1n), setRef(b, L, cl(L, dataOf(L).host), 0))],
  ['corrupt-compressed', 'compressed', (b) => setFeature(b, H.incompatible, 2n)],
  ['dirty-bitmap', 'bitmap', (b) => setFeature(b, H.incompatible, 1n)],
  ['corrupt-extl2', 'extl2', (b) => setFeature(b, H.incompatible, 2n)],
];

/** L1 entries. */
const l1: Row[] = [
  ['reserved-bits-56-62', 'v3', (b, L) => orEntry(b, l1At(L), 0x7f00000000000000n)],
  ['reserved-bit-56', 'v3', (b, L) => orEntry(b, l1At(L), 1n << 56n)],
  ['reserved-bits-1-8', 'v3', (b, L) => orEntry(b, l1At(L), 0x1fen)],
  ['reserved-bit-0', 'v3', (b, L) => orEntry(b, l1At(L), 1n)],
  ['unaligned-512', 'v3', (b, L) => setL1(b, L, COPIED | big(l2Of(L) + 512))],
  ['unaligned-32k', 'v3', (b, L) => setL1(b, L, COPIED | big(l2Of(L) + 32 * KiB))],
  ['past-eof', 'v3', (b, L) => setL1(b, L, COPIED | big(pastEof(L)))],
  ['huge-offset', 'v3', (b, L) => setL1(b, L, COPIED | (OFFSET_MASK & ~big(L.cs - 1)))],
  ['copied-without-offset', 'v3', (b, L) => setL1(b, L, COPIED)],
  ['zeroed', 'v3', (b, L) => setL1(b, L, 0)],
  ['at-refcount-table', 'v3', (b, L) => setL1(b, L, COPIED | big(L.rtOffset))],
  ['at-refcount-block', 'v3', (b, L) => setL1(b, L, COPIED | big(rbOf(L)))],
  ['at-l1', 'v3', (b, L) => setL1(b, L, COPIED | big(L.l1Offset))],
  ['at-data', 'v3', (b, L) => setL1(b, L, COPIED | big(dataOf(L).host))],
  ['copied-cleared', 'v3', (b, L) => andEntry(b, l1At(L), COPIED)],
  ['l2-refcount-2', 'v3', (b, L) => setRef(b, L, cl(L, l2Of(L)), 2)],
  ['l2-refcount-2-copied-cleared', 'v3', (b, L) => (setRef(b, L, cl(L, l2Of(L)), 2), andEntry(b, l1At(L), COPIED))],
  ['two-share-l2-beyond-size', 'v3', (b, L) => (w32(b, H.l1Size, 2), setL1(b, L, r64(b, l1At(L)), 1))],
  ['two-share-l2', 'c512', (b, L) => setL1(b, L, r64(b, l1At(L)), 1)],
  ['two-share-l2-refcount-2', 'c512', (b, L) => (setL1(b, L, r64(b, l1At(L)) & ~COPIED, 1), andEntry(b, l1At(L), COPIED), setRef(b, L, cl(L, l2Of(L)), 2))],
  ['past-eof-c512', 'c512', (b, L) => setL1(b, L, COPIED | big(pastEof(L)), 3)],
  ['at-l1-c512', 'c512', (b, L) => setL1(b, L, COPIED | big(L.l1Offset), 1)],
  ['unaligned-c512', 'c512', (b, L) => setL1(b, L, COPIED | big(L.l2[1]! + 256), 1)],
  ['at-other-l2-c512', 'c512', (b, L) => setL1(b, L, r64(b, l1At(L, 3)), 2)],
  ['at-bitmap-directory', 'bitmap', (b, L) => setL1(b, L, COPIED | big(L.bitmaps!.dirOffset))],
];

/** L2 entries (standard and extended). */
const l2: Row[] = [
  ['reserved-bits-1-8', 'v3', (b, L) => orEntry(b, dataOf(L).at, 0x1fen)],
  ['reserved-bit-1', 'v3', (b, L) => orEntry(b, dataOf(L).at, 2n)],
  ['reserved-bit-8', 'v3', (b, L) => orEntry(b, dataOf(L).at, 0x100n)],
  ['reserved-bits-56-61', 'v3', (b, L) => orEntry(b, dataOf(L).at, 0x3f00000000000000n)],
  ['reserved-bit-56', 'v3', (b, L) => orEntry(b, dataOf(L).at, 1n << 56n)],
  ['reserved-bit-61', 'v3', (b, L) => orEntry(b, dataOf(L).at, 1n << 61n)],
  ['reserved-bits-on-zero-plain', 'v3', (b, L) => orEntry(b, L.zero.find((e) => e.host === 0)!.at, 0x1fen)],
  ['unaligned-512', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(dataOf(L).host + 512))],
  ['unaligned-4k', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(dataOf(L).host + 4096))],
  ['past-eof', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(pastEof(L)))],
  ['just-past-eof', 'v3', (b, L) => w64(b, dataOf(L, 1).at, COPIED | big(roundUp(L.fileLength, L.cs)))],
  ['huge-offset', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | (OFFSET_MASK & ~big(L.cs - 1)))],
  ['copied-without-offset', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED)],
  ['at-l1', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(L.l1Offset))],
  ['at-own-l2', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(l2Of(L)))],
  ['at-refcount-table', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(L.rtOffset))],
  ['at-refcount-block', 'v3', (b, L) => w64(b, dataOf(L).at, COPIED | big(rbOf(L)))],
  ['at-l2-not-copied', 'v3', (b, L) => w64(b, dataOf(L).at, big(l2Of(L)))],
  ['zero-flag-past-eof', 'v3', (b, L) => w64(b, L.zero[0]!.at, COPIED | big(pastEof(L)) | ZERO)],
  ['zero-flag-unaligned', 'v3', (b, L) => w64(b, L.zero[0]!.at, COPIED | big(dataOf(L).host + 1024) | ZERO)],
  ['zero-flag-at-l1', 'v3', (b, L) => w64(b, L.zero[0]!.at, COPIED | big(L.l1Offset) | ZERO)],
  ['zero-flag-at-refcount-block', 'v3', (b, L) => w64(b, L.zero[0]!.at, COPIED | big(rbOf(L)) | ZERO)],
  ['zero-flag-on-data', 'v3', (b, L) => orEntry(b, dataOf(L).at, ZERO)],
  ['zero-flag-on-v2', 'v2', (b, L) => orEntry(b, dataOf(L).at, ZERO)],
  ['zero-flag-on-v2-no-offset', 'v2', (b, L) => w64(b, entryAt(L, 6 * MiB), ZERO)],
  ['copied-refcount-2', 'v3', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 2)],
  ['copied-cleared', 'v3', (b, L) => andEntry(b, dataOf(L).at, COPIED)],
  ['shared-data', 'v3', (b, L) => w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at))],
  ['shared-data-not-copied', 'v3', (b, L) => (andEntry(b, dataOf(L).at, COPIED), w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at)))],
  ['shared-data-refcount-2', 'v3', (b, L) => (andEntry(b, dataOf(L).at, COPIED), w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at)), setRef(b, L, cl(L, dataOf(L).host), 2))],
  ['shared-with-zero-alloc', 'v3', (b, L) => w64(b, L.zero.find((e) => e.host !== 0)!.at, r64(b, dataOf(L).at) | ZERO)],
  ['compressed-flag-on-normal', 'v3', (b, L) => orEntry(b, dataOf(L).at, COMPRESSED)],
  ['beyond-size-past-eof', 'v3', (b, L) => w64(b, entryAt(L, 200 * L.cs), COPIED | big(pastEof(L)))],
  ['beyond-size-at-l1', 'v3', (b, L) => w64(b, entryAt(L, 200 * L.cs), COPIED | big(L.l1Offset))],
  ['shared-data-c512', 'c512', (b, L) => w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at))],
  ['shared-across-tables-c512', 'c512', (b, L) => w64(b, entryAt(L, 100 * KiB), r64(b, dataOf(L).at))],
  ['past-eof-c512', 'c512', (b, L) => w64(b, dataOf(L, 3).at, COPIED | big(pastEof(L)))],
  ['at-l2-c512', 'c512', (b, L) => w64(b, dataOf(L).at, COPIED | big(L.l2[3]!))],
  ['shared-data-refcount1', 'refcount1', (b, L) => w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at))],
  ['at-refcount-block-refcount64', 'refcount64', (b, L) => w64(b, dataOf(L).at, COPIED | big(rbOf(L)))],
  ['extl2-alloc-zero-overlap', 'extl2', (b, L) => w32(b, dataOf(L).at + 8, r32(b, dataOf(L).at + 12))],
  ['extl2-alloc-without-offset', 'extl2', (b, L) => w32(b, entryAt(L, 4 * MiB) + 12, 0xffffffff)],
  ['extl2-alloc-past-eof', 'extl2', (b, L) => (w64(b, entryAt(L, 4 * MiB), COPIED | big(pastEof(L))), w32(b, entryAt(L, 4 * MiB) + 12, 1))],
  ['extl2-zero-bits-garbage-offset', 'extl2', (b, L) => (w64(b, entryAt(L, 4 * MiB), COPIED | big(pastEof(L)) | 0x1c0n), w32(b, entryAt(L, 4 * MiB) + 8, 0xffffffff))],
  ['extl2-standard-zero-flag', 'extl2', (b, L) => orEntry(b, dataOf(L).at, ZERO)],
  ['extl2-unaligned', 'extl2', (b, L) => w64(b, dataOf(L).at, COPIED | big(dataOf(L).host + 512))],
  ['extl2-compressed-with-bitmaps', 'extl2', (b, L) => orEntry(b, dataOf(L).at, COMPRESSED)],
  ['extl2-at-l1', 'extl2', (b, L) => w64(b, dataOf(L).at, COPIED | big(L.l1Offset))],
  ['extl2-shared-data', 'extl2', (b, L) => (w64(b, dataOf(L, 1).at, r64(b, dataOf(L).at)), w32(b, dataOf(L, 1).at + 12, 0xffffffff))],
];

/** Refcount table, blocks and counts. */
const refcount: Row[] = [
  ['block-zeroed', 'v3', (b, L) => void b.fill(0, rbOf(L), rbOf(L) + L.cs)],
  ['block-zeroed-c512', 'c512', (b, L) => void b.fill(0, rbOf(L), rbOf(L) + L.cs)],
  ['block-zeroed-refcount1', 'refcount1', (b, L) => void b.fill(0, rbOf(L), rbOf(L) + L.cs)],
  ['block-all-ones', 'v3', (b, L) => void b.fill(0xff, rbOf(L), rbOf(L) + L.cs)],
  ['table-entry-zero', 'v3', (b, L) => w64(b, rtAt(L), 0)],
  ['table-entry-zero-c512', 'c512', (b, L) => w64(b, rtAt(L), 0)],
  ['table-entry-at-l2', 'v3', (b, L) => w64(b, rtAt(L), l2Of(L))],
  ['table-entry-at-l1', 'v3', (b, L) => w64(b, rtAt(L), L.l1Offset)],
  ['table-entry-at-refcount-table', 'v3', (b, L) => w64(b, rtAt(L), L.rtOffset)],
  ['table-entry-at-data', 'v3', (b, L) => w64(b, rtAt(L), dataOf(L).host)],
  ['table-entry-unaligned', 'v3', (b, L) => w64(b, rtAt(L), rbOf(L) + 512)],
  ['table-entry-past-eof', 'v3', (b, L) => w64(b, rtAt(L), pastEof(L))],
  ['table-entry-bit63', 'v3', (b, L) => w64(b, rtAt(L), (1n << 63n) | big(rbOf(L)))],
  ['table-entry-second-past-eof', 'v3', (b, L) => w64(b, rtAt(L, 1), pastEof(L))],
  ['table-entry-duplicate', 'v3', (b, L) => w64(b, rtAt(L, 1), rbOf(L))],
  ['zero-for-data', 'v3', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 0)],
  ['zero-for-last-data', 'v3', (b, L) => setRef(b, L, cl(L, L.data[L.data.length - 1]!.host), 0)],
  ['zero-for-zero-alloc', 'v3', (b, L) => setRef(b, L, cl(L, L.zero.find((e) => e.host !== 0)!.host), 0)],
  ['zero-for-l2', 'v3', (b, L) => setRef(b, L, cl(L, l2Of(L)), 0)],
  ['zero-for-l1', 'v3', (b, L) => setRef(b, L, cl(L, L.l1Offset), 0)],
  ['zero-for-header', 'v3', (b, L) => setRef(b, L, 0, 0)],
  ['zero-for-refcount-table', 'v3', (b, L) => setRef(b, L, cl(L, L.rtOffset), 0)],
  ['zero-for-refcount-block', 'v3', (b, L) => setRef(b, L, cl(L, rbOf(L)), 0)],
  ['zero-for-data-c512', 'c512', (b, L) => setRef(b, L, cl(L, dataOf(L, 5).host), 0)],
  ['zero-for-l2-refcount1', 'refcount1', (b, L) => setRef(b, L, cl(L, l2Of(L)), 0)],
  ['zero-for-data-refcount64', 'refcount64', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 0)],
  ['zero-for-data-lazy', 'lazy', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 0)],
  ['zero-for-data-v2', 'v2', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 0)],
  ['leak-refcount-2-not-copied', 'v3', (b, L) => (setRef(b, L, cl(L, dataOf(L).host), 2), andEntry(b, dataOf(L).at, COPIED))],
  ['leak-unreferenced-data', 'v3', (b, L) => w64(b, dataOf(L, 1).at, 0)],
  ['leak-appended-cluster', 'v3', (b, L) => {
    const grown = Buffer.concat([b, Buffer.alloc(L.cs, 0x99)]);
    setRef(grown, L, cl(L, b.length), 1);
    return grown;
  }],
  ['leak-max-refcount', 'v3', (b, L) => (setRef(b, L, cl(L, dataOf(L).host), 0xffff), andEntry(b, dataOf(L).at, COPIED))],
  ['leak-l2-refcount-3', 'v3', (b, L) => (setRef(b, L, cl(L, l2Of(L)), 3), andEntry(b, l1At(L), COPIED))],
  ['refcount-3-copied', 'v3', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 3)],
  ['refcount-past-eof', 'v3', (b, L) => setRef(b, L, cl(L, L.fileLength) + 10, 1)],
  ['refcount-2p63-refcount64', 'refcount64', (b, L) => setRef(b, L, cl(L, dataOf(L).host), 1n << 63n)],
  ['refcount-2p53-header-refcount64', 'refcount64', (b, L) => setRef(b, L, 0, 1n << 53n)],
  ['refcount-1-free-refcount1', 'refcount1', (b, L) => setRef(b, L, cl(L, L.fileLength) + 3, 1)],
  ['table-clusters-0', 'v3', (b) => w32(b, H.refcountTableClusters, 0)],
  ['table-clusters-2', 'v3', (b) => w32(b, H.refcountTableClusters, 2)],
  ['table-clusters-past-eof', 'v3', (b) => w32(b, H.refcountTableClusters, 200)],
  ['table-clusters-129', 'v3', (b) => w32(b, H.refcountTableClusters, 129)],
  ['table-clusters-huge', 'v3', (b) => w32(b, H.refcountTableClusters, 0xffffffff)],
];

/** Compressed cluster descriptors. */
const compressedRows: Row[] = [
  ...(
    [
      ['offset-0', (L) => 0],
      ['at-l2', (L) => l2Of(L)],
      ['at-l1', (L) => L.l1Offset],
      ['at-refcount-table', (L) => L.rtOffset],
      ['at-refcount-block', (L) => rbOf(L)],
      ['offset-past-eof', (L) => pastEof(L)],
      ['sectors-past-eof', (L) => L.fileLength - 512],
    ] as [string, (L: Layout) => number][]
  ).map(([n, host]): Row => [n, 'compressed', (b, L) => w64(b, L.compressed[0]!.at, encodeCompressed(host(L), Math.max(L.compressed[0]!.sectors, 4), L.clusterBits))]),
  ['huge-sectors', 'compressed', (b, L) => w64(b, L.compressed[0]!.at, encodeCompressed(L.compressed[0]!.host, 2 ** (L.clusterBits - 8) - 1, L.clusterBits))],
  ['huge-offset', 'compressed', (b, L) => w64(b, L.compressed[0]!.at, encodeCompressed((1n << big(62 - (L.clusterBits - 8))) - 1n, 0, L.clusterBits))],
  ['copied-flag', 'compressed', (b, L) => orEntry(b, L.compressed[0]!.at, COPIED)],
  ['garbage-data', 'compressed', (b, L) => void b.fill(0xff, L.compressed[0]!.host, L.compressed[0]!.host + 512)],
  ['garbage-random', 'compressed', (b, L) => {
    const c = biggest(L);
    const rnd = prng(11);
    for (let i = c.host; i < c.host + (c.sectors + 1) * 512 - (c.host % 512) && i < b.length; i++) b[i] = Math.floor(rnd() * 256);
  }],
  ['truncated-stream', 'compressed', (b, L) => {
    const c = biggest(L);
    const len = (c.sectors + 1) * 512 - (c.host % 512);
    b.fill(0, c.host + Math.floor(len / 2), c.host + len);
  }],
  ['sectors-0', 'compressed', (b, L) => w64(b, biggest(L).at, encodeCompressed(biggest(L).host, 0, L.clusterBits))],
  ['zero-bit-set', 'compressed', (b, L) => orEntry(b, L.compressed[0]!.at, ZERO)],
  ['shared', 'compressed', (b, L) => w64(b, L.compressed[1]!.at, L.compressed[0]!.value)],
  ['refcount-0', 'compressed', (b, L) => setRef(b, L, cl(L, L.compressed[0]!.host), 0)],
  ['at-normal-data', 'compressed', (b, L) => w64(b, L.compressed[0]!.at, encodeCompressed(dataOf(L).host, 0, L.clusterBits))],
];

function biggest(L: Layout): L2Entry {
  return L.compressed.reduce((a, c) => (c.sectors > a.sectors ? c : a));
}

/** Header extensions. */
const extension: Row[] = [
  ['no-end-marker-fill-cluster', 'v3', (b, L) => {
    // The last extension ends exactly at the end of the cluster: QEMU reads that as the end.
    w32(b, L.extEnd, 0x0badcafe);
    w32(b, L.extEnd + 4, L.cs - (L.extEnd + 8));
    b.fill(0x5a, L.extEnd + 8, L.cs);
  }],
  ['no-end-marker-before-backing-name', 'backing', (b, L) => w32(b, L.extEnd, 0x0badcafe)],
  ['no-end-marker-garbage', 'v3', (b, L) => void b.fill(0xa5, L.extEnd, L.cs)],
  ['last-extension-empty-at-area-end', 'v3', (b, L) => {
    // An unknown extension up to the last 8 bytes, then an empty one ending exactly at the cluster end.
    w32(b, L.extEnd, 0x0badcafe);
    w32(b, L.extEnd + 4, L.cs - (L.extEnd + 8) - 8);
    w32(b, L.cs - 8, 0x0badcafe);
  }],
  ['last-extension-data-past-area-end', 'v3', (b, L) => {
    w32(b, L.extEnd, 0x0badcafe);
    w32(b, L.extEnd + 4, L.cs - (L.extEnd + 8) - 8);
    w32(b, L.cs - 8, 0x0badcafe);
    w32(b, L.cs - 4, 8);
  }],
  ['length-past-cluster', 'v3', (b, L) => w32(b, L.exts[0]!.at + 4, L.cs)],
  ['length-huge', 'v3', (b, L) => w32(b, L.exts[0]!.at + 4, 0xffffffff)],
  ['length-into-backing-name', 'backing', (b, L) => w32(b, L.exts[0]!.at + 4, L.backing!.at - L.exts[0]!.at)],
  ['feature-names-length-47', 'v3', (b, L) => w32(b, L.exts.find((e) => e.type === EXT_FEATURE_NAMES)!.at + 4, 47)],
  ['feature-names-length-0', 'v3', (b, L) => setArea(b, L, [ext(EXT_FEATURE_NAMES, Buffer.alloc(0)), ...extsOf(L, [EXT_FEATURE_NAMES])])],
  ['feature-names-garbage', 'v3', (b, L) => {
    const f = L.exts.find((e) => e.type === EXT_FEATURE_NAMES)!;
    for (let i = 0; i < f.length; i += 48) b.fill(0xfe, f.at + 8 + i + 2, f.at + 8 + i + 48);
  }],
  ['duplicate-feature-names', 'v3', (b, L) => setArea(b, L, [...extsOf(L), ...extsOf(L).slice(0, 1)])],
  ['duplicate-bitmaps', 'bitmap', (b, L) => setArea(b, L, [...extsOf(L), ext(EXT_BITMAPS, L.exts.find((e) => e.type === EXT_BITMAPS)!.data)])],
  ['duplicate-bitmaps-mismatch', 'bitmap', (b, L) => {
    const data = Buffer.from(L.exts.find((e) => e.type === EXT_BITMAPS)!.data);
    w32(data, 0, 1);
    w64(data, 8, 24 + 8);
    setArea(b, L, [...extsOf(L), ext(EXT_BITMAPS, data)]);
  }],
  ['duplicate-backing-format-raw', 'backing', (b, L) => setArea(b, L, [...extsOf(L), ext(EXT_BACKING_FORMAT, 'raw')])],
  ['duplicate-backing-format-same', 'backing', (b, L) => setArea(b, L, [...extsOf(L), ext(EXT_BACKING_FORMAT, 'qcow2')])],
  ['backing-format-raw', 'backing', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, 'raw'), ...extsOf(L, [EXT_BACKING_FORMAT])])],
  ['backing-format-empty', 'backing', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, ''), ...extsOf(L, [EXT_BACKING_FORMAT])])],
  ['backing-format-nul', 'backing', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, 'qcow2\0'), ...extsOf(L, [EXT_BACKING_FORMAT])])],
  ['backing-format-vmdk', 'backing', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, 'vmdk'), ...extsOf(L, [EXT_BACKING_FORMAT])])],
  ['backing-format-long', 'backing', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, 'qcow2qcow2qcow2qcow2'), ...extsOf(L, [EXT_BACKING_FORMAT])])],
  ['backing-format-without-backing', 'v3', (b, L) => setArea(b, L, [ext(EXT_BACKING_FORMAT, 'qcow2'), ...extsOf(L)])],
  ['unknown', 'v3', (b, L) => setArea(b, L, [ext(0x12345678, Buffer.alloc(16, 0x77)), ...extsOf(L)])],
  ['unknown-many', 'v3', (b, L) => setArea(b, L, [...Array.from({ length: 100 }, (_, i) => ext(0x10000000 + i, Buffer.alloc(i % 9, i))), ...extsOf(L, [EXT_FEATURE_NAMES])])],
  ['unknown-odd-length', 'backing', (b, L) => setArea(b, L, [ext(0x12345678, Buffer.alloc(13, 0x77)), ...extsOf(L)])],
  ['fde-on-unencrypted', 'v3', (b, L) => setArea(b, L, [ext(EXT_FDE, Buffer.alloc(16)), ...extsOf(L)])],
  ['fde-wrong-length', 'v3', (b, L) => setArea(b, L, [ext(EXT_FDE, Buffer.alloc(8)), ...extsOf(L)])],
  ['data-file-without-bit', 'v3', (b, L) => setArea(b, L, [ext(EXT_DATA_FILE, 'ext.data'), ...extsOf(L)])],
  ['bitmaps-length-16', 'bitmap', (b, L) => w32(b, L.bitmaps!.extAt + 4, 16)],
  ['bitmaps-reserved-nonzero', 'bitmap', (b, L) => w32(b, bmExtData(L) + 4, 1)],
  ['bitmaps-on-v2', 'v2', (b, L) => setArea(b, L, [ext(EXT_BITMAPS, Buffer.from('000000010000000000000000000000200000000000010000', 'hex'))])],
];

/** Backing file names. */
const backing: Row[] = [
  ['nul-inside', 'backing', (b, L) => void (b[L.backing!.at + 3] = 0)],
  ['all-nul', 'backing', (b, L) => void b.fill(0, L.backing!.at, L.backing!.at + L.backing!.size)],
  ['size-covers-padding', 'backing', (b, L) => w32(b, H.backingFileSize, L.backing!.size + 8)],
  ['name-past-cluster', 'backing', (b, L) => w32(b, H.backingFileSize, L.cs - L.backing!.at + 10)],
  ['offset-past-cluster', 'backing', (b, L) => w64(b, H.backingFileOffset, L.cs + 16)],
  ['offset-inside-header', 'backing', (b) => w64(b, H.backingFileOffset, 16)],
  ['size-0', 'backing', (b) => w32(b, H.backingFileSize, 0)],
  ['size-huge', 'backing', (b) => w32(b, H.backingFileSize, 0xffffffff)],
  ['size-1024', 'backing', (b) => w32(b, H.backingFileSize, 1024)],
  ['protocol-nbd', 'backing', (b, L) => setBackingName(b, L, 'nbd+unix:///x?socket=/nonexistent/nbdd-damage.sock')],
  ['protocol-json', 'backing', (b, L) => setBackingName(b, L, 'json:{"driver":"null-co","size":8388608,"read-zeroes":true}')],
  ['protocol-file', 'backing', (b, L) => setBackingName(b, L, `file:${L.backing!.name}`)],
  ['protocol-http', 'backing', (b, L) => setBackingName(b, L, 'http://127.0.0.1:1/nbdd-damage.qcow2')],
  ['nonexistent', 'backing', (b, L) => setBackingName(b, L, 'no-such-backing.qcow2')],
  ['loop-to-itself', 'backing', (b, L, ctx) => setBackingName(b, L, ctx.file)],
  ['loop-to-itself-raw-format', 'backing', (b, L, ctx) => (setArea(b, L, [ext(EXT_BACKING_FORMAT, 'raw')]), setBackingName(b, parse(b), ctx.file))],
  ['directory', 'backing', (b, L) => setBackingName(b, L, '.')],
  ['dev-null', 'backing', (b, L) => setBackingName(b, L, '/dev/null')],
  ['invalid-utf8', 'backing', (b, L) => setBackingName(b, L, Buffer.from([0xff, 0xfe, 0xfd, 0x2e, 0x71]))],
  ['name-1023', 'backing', (b, L) => setBackingName(b, L, 'a'.repeat(1023))],
  ['name-on-v3-nonexistent', 'v3', (b, L) => setBackingName(b, L, 'ghost.qcow2')],
  ['name-on-v3-all-nul', 'v3', (b, L) => (w64(b, H.backingFileOffset, L.extEnd + 8), w32(b, H.backingFileSize, 16))],
  ['name-on-v2', 'v2', (b, L) => setBackingName(b, L, 'ghost.qcow2')],
];

/** The bitmap directory and tables. */
const dirField = (offset: number, write: (b: Buffer, at: number) => void, i = 0): Edit => (b, L) => write(b, bm(L, i).at + offset);
const bitmap: Row[] = [
  ['dir-size-0', 'bitmap', (b, L) => w64(b, bmExtData(L) + 8, 0)],
  ['dir-size-23', 'bitmap', (b, L) => w64(b, bmExtData(L) + 8, 23)],
  ['dir-size-plus-8', 'bitmap', (b, L) => w64(b, bmExtData(L) + 8, L.bitmaps!.dirSize + 8)],
  ['dir-size-huge', 'bitmap', (b, L) => w64(b, bmExtData(L) + 8, 0xffffffffffffn)],
  ['dir-size-2p63', 'bitmap', (b, L) => w64(b, bmExtData(L) + 8, 1n << 63n)],
  ['dir-offset-unaligned', 'bitmap', (b, L) => w64(b, bmExtData(L) + 16, L.bitmaps!.dirOffset + 8)],
  ['dir-offset-past-eof', 'bitmap', (b, L) => w64(b, bmExtData(L) + 16, pastEof(L))],
  ['dir-offset-0', 'bitmap', (b, L) => w64(b, bmExtData(L) + 16, 0)],
  ['dir-at-l1', 'bitmap', (b, L) => w64(b, bmExtData(L) + 16, L.l1Offset)],
  ['dir-at-l2', 'bitmap', (b, L) => w64(b, bmExtData(L) + 16, l2Of(L))],
  ['nb-bitmaps-0', 'bitmap', (b, L) => w32(b, bmExtData(L), 0)],
  ['nb-bitmaps-1', 'bitmap', (b, L) => w32(b, bmExtData(L), 1)],
  ['nb-bitmaps-3', 'bitmap', (b, L) => w32(b, bmExtData(L), 3)],
  ['nb-bitmaps-65536', 'bitmap', (b, L) => w32(b, bmExtData(L), 65536)],
  ['name-size-0', 'bitmap', dirField(18, (b, at) => void b.writeUInt16BE(0, at))],
  ['name-size-1024', 'bitmap', dirField(18, (b, at) => void b.writeUInt16BE(1024, at))],
  ['name-size-past-directory', 'bitmap', dirField(18, (b, at) => void b.writeUInt16BE(200, at), 1)],
  ['duplicate-names', 'bitmap', (b, L) => void b.write('b0', bm(L, 1).at + 24, 'latin1')],
  ['invalid-utf8-name', 'bitmap', (b, L) => ((b[bm(L).at + 24] = 0xff), (b[bm(L).at + 25] = 0xfe))],
  ['type-0', 'bitmap', dirField(16, (b, at) => void (b[at] = 0))],
  ['type-2', 'bitmap', dirField(16, (b, at) => void (b[at] = 2))],
  ['flags-unknown-bit5', 'bitmap', dirField(12, (b, at) => w32(b, at, r32(b, at) | 32))],
  ['flags-extra-data-compatible', 'bitmap', dirField(12, (b, at) => w32(b, at, r32(b, at) | 4))],
  ...[0, 8, 32, 63].map((g): Row => [`granularity-${g}`, 'bitmap', dirField(17, (b, at) => void (b[at] = g))]),
  ['extra-data-size-8', 'bitmap', dirField(20, (b, at) => w32(b, at, 8))],
  ['table-size-0', 'bitmap', dirField(8, (b, at) => w32(b, at, 0))],
  ['table-size-plus-1', 'bitmap', dirField(8, (b, at) => w32(b, at, r32(b, at) + 1))],
  ['table-size-huge', 'bitmap', dirField(8, (b, at) => w32(b, at, 0xffffffff))],
  ['table-offset-unaligned', 'bitmap', dirField(0, (b, at) => w64(b, at, r64(b, at) + 8n))],
  ['table-offset-past-eof', 'bitmap', (b, L) => w64(b, bm(L).at, pastEof(L))],
  ['table-offset-0', 'bitmap', dirField(0, (b, at) => w64(b, at, 0))],
  ['table-offset-at-l2', 'bitmap', (b, L) => w64(b, bm(L).at, l2Of(L))],
  ['table-entry-reserved-bit1', 'bitmap', (b, L) => orEntry(b, bmData(L).entryAt, 2n)],
  ['table-entry-reserved-bit60', 'bitmap', (b, L) => orEntry(b, bmData(L).entryAt, 1n << 60n)],
  ['table-entry-unaligned', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, bmData(L).host + 512)],
  ['table-entry-past-eof', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, pastEof(L))],
  ['table-entry-at-l2', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, l2Of(L))],
  ['table-entry-at-l1', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, L.l1Offset)],
  ['table-entry-at-refcount-table', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, L.rtOffset)],
  ['table-entry-at-data', 'bitmap', (b, L) => w64(b, bmData(L).entryAt, dataOf(L).host)],
  ['table-entry-ones-with-offset', 'bitmap', (b, L) => orEntry(b, bmData(L).entryAt, 1n)],
  ['in-use', 'bitmap', dirField(12, (b, at) => w32(b, at, r32(b, at) | 1))],
  ['in-use-disabled', 'bitmap', dirField(12, (b, at) => w32(b, at, r32(b, at) | 1), 1)],
  ['autoclear-clear', 'bitmap', (b) => clearFeature(b, H.autoclear, 1n)],
  ['data-cluster-refcount-0', 'bitmap', (b, L) => setRef(b, L, cl(L, bmData(L).host), 0)],
  ['table-refcount-0', 'bitmap', (b, L) => setRef(b, L, cl(L, bm(L).tableOffset), 0)],
  ['directory-refcount-0', 'bitmap', (b, L) => setRef(b, L, cl(L, L.bitmaps!.dirOffset), 0)],
  ['table-shared-by-both', 'bitmap', (b, L) => (w64(b, bm(L, 1).at, bm(L).tableOffset), w32(b, bm(L, 1).at + 8, bm(L).tableSize), (b[bm(L, 1).at + 17] = bm(L).granularityBits))],
];

/** Truncated files. */
const truncated: Row[] = [
  ['to-0', 'v3', (b) => cut(b, 0)],
  ['to-50', 'v3', (b) => cut(b, 50)],
  ['to-100', 'v3', (b) => cut(b, 100)],
  ['to-one-cluster', 'v3', (b, L) => cut(b, L.cs)],
  ['inside-refcount-table', 'v3', (b, L) => cut(b, L.rtOffset + 4)],
  ['inside-refcount-block', 'v3', (b, L) => cut(b, rbOf(L) + 8)],
  ['at-l1', 'v3', (b, L) => cut(b, L.l1Offset)],
  ['inside-l1', 'v3', (b, L) => cut(b, L.l1Offset + 4)],
  ['inside-l2', 'v3', (b, L) => cut(b, l2Of(L) + 100)],
  ['inside-first-data', 'v3', (b, L) => cut(b, dataOf(L).host + L.cs / 2)],
  ['inside-last-data', 'v3', (b, L) => cut(b, Math.max(...L.data.map((e) => e.host)) + L.cs / 2)],
  ['last-byte', 'v3', (b) => cut(b, b.length - 1)],
  ['last-sector', 'v3', (b) => cut(b, b.length - 512)],
  ['inside-l2-c512', 'c512', (b, L) => cut(b, L.l2[1]! + 100)],
  ['inside-data-extl2', 'extl2', (b, L) => cut(b, Math.max(...L.data.map((e) => e.host)) + 4096)],
  ['inside-compressed', 'compressed', (b, L) => cut(b, biggest(L).host + 100)],
  ['inside-bitmap-directory', 'bitmap', (b, L) => cut(b, L.bitmaps!.dirOffset + 10)],
  ['inside-l2-v2', 'v2', (b, L) => cut(b, l2Of(L) + 8)],
  ['inside-l2-backing', 'backing', (b, L) => cut(b, l2Of(L) + 8)],
  ['inside-data-refcount64', 'refcount64', (b, L) => cut(b, dataOf(L, 2).host + 10)],
];

/** Every base unchanged (they must pass everything). */
const control: Row[] = BASES.map((base): Row => [base, base, () => undefined]);

export const CASES: DamagedCase[] = [
  ...group('control', control),
  ...group('header', header),
  ...group('flags', flags),
  ...group('l1', l1),
  ...group('l2', l2),
  ...group('refcount', refcount),
  ...group('compressed', compressedRows),
  ...group('extension', extension),
  ...group('backing', backing),
  ...group('bitmap', bitmap),
  ...group('truncated', truncated),
];

{
  const seen = new Set<string>();
  for (const c of CASES) {
    if (seen.has(c.name) || !/^[a-z0-9._-]+$/i.test(c.name)) throw new Error(`damage: bad or duplicate case name ${c.name}`);
    seen.add(c.name);
  }
}

/* ------------------------------------------------------------------ running cases */

/** Writes case `c` (applied to a copy of its base) as `dir/<name>.qcow2` and returns the path. */
export function buildCase(c: DamagedCase, bases: Record<BaseName, string>, dir: string): string {
  mkdirSync(dir, { recursive: true });
  const file = `${c.name}.qcow2`;
  const buf = Buffer.from(readFileSync(bases[c.base]));
  const result = c.apply(buf, { file, dir });
  const out = Buffer.isBuffer(result) ? result : buf;
  const path = join(dir, file);
  writeFileSync(path, out);
  return path;
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export interface QemuCheck {
  /** qemu-img check's exit status (0 clean, 1 check errors or no open, 2 corruptions, 3 leaks; -1 timeout). */
  status: number;
  /** The check ran to the end (status 0, 2 or 3 with a JSON report). */
  completed: boolean;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  /** stderr when the check did not complete. */
  error?: string;
}

/** `qemu-img check --output=json` (read-only, nothing repaired); never throws. */
export function qemuCheckJson(path: string, timeoutMs = 10_000): QemuCheck {
  let stdout = '';
  let stderr = '';
  let status = 0;
  try {
    stdout = execFileSync('qemu-img', ['check', '--output=json', path], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, maxBuffer: 64 << 20 });
  } catch (err) {
    const e = err as { status?: number | null; stdout?: string; stderr?: string; signal?: string };
    status = e.status ?? -1;
    stdout = e.stdout ?? '';
    stderr = e.stderr ?? (e.signal ? `killed by ${e.signal}` : '');
  }
  let report: Record<string, number> | null = null;
  try {
    report = JSON.parse(stdout) as Record<string, number>;
  } catch {
    report = null;
  }
  const completed = report !== null && (status === 0 || status === 2 || status === 3);
  return {
    status,
    completed,
    corruptions: report?.['corruptions'] ?? 0,
    leaks: report?.['leaks'] ?? 0,
    checkErrors: report?.['check-errors'] ?? 0,
    ...(completed ? {} : { error: stderr.trim().split('\n').slice(0, 3).join(' | ') || `exit ${status}` }),
  };
}

export function describeCheck(q: QemuCheck): string {
  if (!q.completed) return `no check (${q.status}): ${q.error}`;
  if (q.corruptions > 0) return `corrupt ${q.corruptions}${q.leaks ? `, leaks ${q.leaks}` : ''}`;
  if (q.leaks > 0) return `leaks ${q.leaks}`;
  return 'clean';
}
