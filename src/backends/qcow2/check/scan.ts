/**
 * The full reference scan of a qcow2 image, as `qemu-img check` does it (block/qcow2-refcount.c,
 * `qcow2_check_refcounts`): every cluster the image references — header, active L1 and its L2
 * tables and data, the refcount table and blocks, the bitmap directory, tables and data, the
 * snapshot table and every snapshot's L1/L2 tables — is counted, every entry on the way is
 * validated, and the counts are compared with the stored refcounts:
 *
 *   stored < referenced  corruption (a write could reuse a cluster in use)
 *   stored > referenced  leak (wasted space only)
 *
 * plus the COPIED flag of active L1/L2 entries against the stored count (set exactly when it is
 * 1), and clusters used as two different things. Nothing is written; `repair.ts` fixes what it can.
 * The writable open runs it too, and refuses an image with any corruption before writing a byte.
 */
import type { FilePort } from '../../../io/file-port.js';
import { messageOf } from '../../../core/errors.js';
import {
  AUTOCLEAR_BITMAPS,
  decodeBitmapDirectory,
  decodeBitmapTable,
  decodeCompressed,
  ENTRY_COMPRESSED_HI,
  ENTRY_COPIED_HI,
  ENTRY_ZERO_LO,
  entryOffset,
  getRefcount,
  hex,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  L2_ALLOC_BITS,
  L2_RESERVED_HI,
  L2_RESERVED_LO,
  L2_ZERO_BITS,
  maxRefcount,
  MAX_L1_BYTES,
  type Geometry,
  type HeaderExtensions,
  type Qcow2Header,
} from '../format/index.js';
import { References, Role } from './references.js';

/** L2 tables read at a time. */
const READ_PARALLEL = 16;
/** Messages kept per kind; the counts go on. */
const MAX_MESSAGES = 200;
/** Snapshot table entry: fixed part before extra data, id and name. */
const SNAPSHOT_FIXED = 40;

/** An active L1 or L2 entry whose COPIED flag is checked against the stored refcount. */
export interface CopiedEntry {
  /** File offset of the entry's first word. */
  at: number;
  hi: number;
  cluster: number;
  /** L1 entry (an L2 table) or L2 entry (data). */
  kind: 'l1' | 'l2';
}

/**
 * Every active entry with a host cluster, in parallel typed arrays: an image has one per
 * allocated cluster, far too many for an object each.
 */
export class CopiedEntries {
  private at = new Float64Array(1024);
  private hi = new Uint32Array(1024);
  private cluster = new Float64Array(1024);
  private l1 = new Uint8Array(1024);
  length = 0;

  push(at: number, hi: number, cluster: number, kind: 'l1' | 'l2'): void {
    if (this.length === this.at.length) this.grow();
    const i = this.length++;
    this.at[i] = at;
    this.hi[i] = hi;
    this.cluster[i] = cluster;
    this.l1[i] = kind === 'l1' ? 1 : 0;
  }

  /** Calls `fn` for each entry whose COPIED flag disagrees with `refcountIs1(cluster)`. */
  forEachMismatch(refcountIs1: (cluster: number) => boolean, fn: (e: CopiedEntry) => void): void {
    for (let i = 0; i < this.length; i++) {
      const c = this.cluster[i]!;
      if (refcountIs1(c) === ((this.hi[i]! & ENTRY_COPIED_HI) !== 0)) continue;
      fn({ at: this.at[i]!, hi: this.hi[i]!, cluster: c, kind: this.l1[i] ? 'l1' : 'l2' });
    }
  }

  private grow(): void {
    const n = this.at.length * 2;
    const at = new Float64Array(n);
    at.set(this.at);
    const hi = new Uint32Array(n);
    hi.set(this.hi);
    const cluster = new Float64Array(n);
    cluster.set(this.cluster);
    const l1 = new Uint8Array(n);
    l1.set(this.l1);
    Object.assign(this, { at, hi, cluster, l1 });
  }
}

/** The stored refcount structure as found. */
export interface StoredRefcounts {
  /** Block offsets by table index (0: none), as far as the table could be read. */
  table: number[];
  blocks: Map<number, Buffer>;
  /** Clusters the refcount table and blocks occupy, once per reference (a rebuild drops them). */
  structureClusters: number[];
  get(cluster: number): number;
}

export interface ScanInput {
  port: FilePort;
  header: Qcow2Header;
  extensions: HeaderExtensions;
  geometry: Geometry;
  fileLength: number;
}

export interface ScanResult {
  refs: References;
  stored: StoredRefcounts;
  copied: CopiedEntries;
  /** Problems in what maps guest data or bitmaps (entries, tables, clusters used twice): one corruption each; never repaired. */
  entryErrors: string[];
  /** Problems in the refcount table and blocks themselves: one corruption each; a rebuild replaces them. */
  structureErrors: string[];
  /** Refcount mismatches where stored < referenced, and COPIED mismatches: one corruption each. */
  refcountErrors: number;
  leaks: number;
  /** Highest cluster with a stored or referenced count, plus one, in bytes. */
  imageEndOffset: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Clusters the file holds (a partial last one counts). */
  fileClusters: number;
  messages: string[];
}

/** Corruptions a scan found: damaged entries, damaged refcount structure, wrong counts and COPIED flags. */
export function corruptionsOf(scan: ScanResult): number {
  return scan.entryErrors.length + scan.structureErrors.length + scan.refcountErrors;
}

class Collector {
  readonly messages: string[] = [];
  note(message: string): void {
    if (this.messages.length < MAX_MESSAGES) this.messages.push(message);
  }
}

/** Runs `fn` over `items`, READ_PARALLEL at a time; `slot` is the item's place in its batch. */
async function inBatches<T>(items: T[], fn: (item: T, slot: number) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += READ_PARALLEL) await Promise.all(items.slice(i, i + READ_PARALLEL).map(fn));
}

/** Fills `buf` from `offset`; what lies past the end of the file reads as zeroes. */
async function readInto(input: ScanInput, buf: Buffer, offset: number): Promise<Buffer> {
  const n = Math.max(0, Math.min(buf.length, input.fileLength - offset));
  if (n > 0) await input.port.readAt(buf.subarray(0, n), offset);
  buf.fill(0, n);
  return buf;
}

/** Reads `bytes` at `offset` into a new buffer; past the end of the file, zeroes. */
function readRegion(input: ScanInput, offset: number, bytes: number): Promise<Buffer> {
  return readInto(input, Buffer.allocUnsafe(bytes), offset);
}

export async function scanImage(input: ScanInput): Promise<ScanResult> {
  const { header: h, geometry: g, fileLength } = input;
  const cs = g.clusterSize;
  const refs = new References(cs, fileLength);
  const entryErrors: string[] = [];
  const log = new Collector();
  const error = (m: string): void => {
    entryErrors.push(m);
    log.note(`ERROR ${m}`);
  };
  const copied = new CopiedEntries();
  const stats = { allocated: 0, fragmented: 0, compressed: 0 };

  refs.add(0, cs, Role.header, 'header');

  /** Counts one L2 table's references; `active` tables' entries get their COPIED flag checked. */
  const walkL2 = (table: Buffer, tableOffset: number, active: boolean): void => {
    let nextContiguous = 0;
    const whereOf = (i: number): string => `L2 entry ${i} of the table at ${hex(tableOffset)}`;
    for (let i = 0; i < g.l2Entries; i++) {
      const e = i * g.l2EntrySize;
      const hi = table.readUInt32BE(e);
      const lo = table.readUInt32BE(e + 4);
      if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
        if ((hi & ENTRY_COPIED_HI) !== 0) error(`${whereOf(i)}: compressed cluster with the COPIED flag set`);
        const { offset, length } = decodeCompressed(hi, lo, g.clusterBits);
        const sectorStart = offset - (offset % 512);
        refs.add(sectorStart, offset - sectorStart + length, Role.compressed, () => whereOf(i));
        if (active) {
          stats.allocated++;
          stats.compressed++;
          stats.fragmented++;
        }
        continue;
      }
      if ((hi & L2_RESERVED_HI) !== 0 || (lo & L2_RESERVED_LO) !== 0) error(`${whereOf(i)} has reserved bits set (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')})`);
      // With extended L2 qemu ignores bit 0 (the subcluster bitmaps say what is zero): so does nbdd.
      if ((lo & ENTRY_ZERO_LO) !== 0 && h.version === 2) error(`${whereOf(i)} has the zero flag set, which version 2 images do not have`);
      const host = entryOffset(hi, lo);
      if (g.extendedL2) {
        const zeroBits = table.readUInt32BE(e + L2_ZERO_BITS);
        const allocBits = table.readUInt32BE(e + L2_ALLOC_BITS);
        if ((zeroBits & allocBits) !== 0) error(`${whereOf(i)} has subclusters both allocated and zero`);
        if (host === 0 && allocBits !== 0) error(`${whereOf(i)} has allocated subclusters but no host cluster`);
      }
      if (host === 0) continue;
      if (host % cs !== 0) {
        error(`${whereOf(i)}: offset ${hex(host)} is not cluster aligned`);
        continue;
      }
      refs.addCluster(host, Role.data, () => whereOf(i));
      if (!active) continue;
      stats.allocated++;
      if (nextContiguous !== 0 && host !== nextContiguous) stats.fragmented++;
      nextContiguous = host + cs;
      copied.push(tableOffset + e, hi, host / cs, 'l2');
    }
  };

  /** Counts an L1 table, its L2 tables and their references. */
  const walkL1 = async (l1Offset: number, l1Size: number, active: boolean, name: string): Promise<void> => {
    if (l1Size * 8 > MAX_L1_BYTES) {
      error(`${name} of ${l1Size} entries exceeds ${MAX_L1_BYTES} bytes`);
      return;
    }
    if (l1Size === 0) return;
    if (l1Offset % cs !== 0) {
      error(`${name} at ${hex(l1Offset)} is not cluster aligned`);
      return;
    }
    if (!refs.add(l1Offset, l1Size * 8, active ? Role.l1 : Role.snapshotL1, name)) return;
    const l1 = await readRegion(input, l1Offset, l1Size * 8);
    const tables: { offset: number; index: number }[] = [];
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const where = `${name} entry ${i}`;
      if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) error(`${where} has reserved bits set`);
      const off = entryOffset(hi, lo);
      if (off === 0) {
        // qemu's check takes such an entry for an L2 table at offset 0, the header.
        if (hi !== 0 || lo !== 0) error(`${where} has flags set (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')}) but no L2 table`);
        continue;
      }
      if (off % cs !== 0) {
        error(`${where}: L2 table offset ${hex(off)} is not cluster aligned`);
        continue;
      }
      if (!refs.add(off, cs, Role.l2, where)) continue;
      if (active) copied.push(l1Offset + i * 8, hi, off / cs, 'l1');
      tables.push({ offset: off, index: i });
    }
    // One buffer per batch slot, not one per table: walkL2 keeps nothing of the table it reads,
    // and a 1 TiB image has 2048 tables (128 MiB) to read on every writable open.
    const buffers = Array.from({ length: Math.min(READ_PARALLEL, tables.length) }, () => Buffer.allocUnsafe(cs));
    await inBatches(tables, async ({ offset }, slot) => walkL2(await readInto(input, buffers[slot]!, offset), offset, active));
  };

  await walkL1(h.l1TableOffset, h.l1Size, true, 'L1 table');
  const structureErrors: string[] = [];
  const stored = await scanRefcountStructure(input, refs, (m) => {
    structureErrors.push(m);
    log.note(`ERROR ${m}`);
  });
  await scanBitmaps(input, refs, error);
  await scanSnapshots(input, refs, error, walkL1);
  for (const p of refs.problems) error(p);

  // Compare stored and referenced counts, cluster by cluster (qemu's compare_refcounts).
  let refcountErrors = 0;
  let leaks = 0;
  let highest = -1;
  const max = maxRefcount(g.refcountOrder);
  const compare = (c: number): void => {
    const s = stored.get(c);
    const r = refs.count(c);
    if (s > 0 || r > 0) highest = Math.max(highest, c);
    if (r > max) {
      refcountErrors++;
      log.note(`ERROR cluster ${c} is referenced ${r} times, more than ${1 << g.refcountOrder}-bit refcounts hold`);
    } else if (s < r) {
      refcountErrors++;
      log.note(`ERROR cluster ${c} refcount=${s} reference=${r}`);
    } else if (s > r) {
      leaks++;
      log.note(`Leaked cluster ${c} refcount=${s} reference=${r}`);
    }
  };
  const E = g.refcountsPerBlock;
  const seen = new Set<number>();
  // As qemu, counts past the end of the file and of everything referenced are not looked at.
  const limit = Math.max(Math.ceil(fileLength / cs), refs.length);
  for (const t of [...stored.blocks.keys()].sort((a, b) => a - b)) {
    for (let c = t * E; c < Math.min((t + 1) * E, limit); c++) compare(c);
    seen.add(t);
  }
  for (let c = 0; c < refs.length; c++) if (!seen.has(Math.floor(c / E)) && refs.count(c) > 0) compare(c);

  // COPIED: set exactly when the stored refcount is 1 (qemu's check_oflag_copied).
  copied.forEachMismatch(
    (c) => stored.get(c) === 1,
    (e) => {
      refcountErrors++;
      log.note(`ERROR OFLAG_COPIED ${e.kind === 'l1' ? 'L2 cluster' : 'data cluster'}: entry at ${hex(e.at)} refcount=${stored.get(e.cluster)}`);
    },
  );

  return {
    refs,
    stored,
    copied,
    entryErrors,
    structureErrors,
    refcountErrors,
    leaks,
    imageEndOffset: (highest + 1) * cs,
    allocatedClusters: stats.allocated,
    fragmentedClusters: stats.fragmented,
    compressedClusters: stats.compressed,
    totalClusters: Math.ceil(h.size / cs),
    fileClusters: Math.ceil(fileLength / cs),
    messages: log.messages,
  };
}

/** Counts the refcount table and blocks, and reads them (qemu's check_refblocks). */
async function scanRefcountStructure(input: ScanInput, refs: References, error: (m: string) => void): Promise<StoredRefcounts> {
  const { header: h, geometry: g, fileLength } = input;
  const cs = g.clusterSize;
  const blocks = new Map<number, Buffer>();
  const table: number[] = [];
  const get = (cluster: number): number => {
    const block = blocks.get(Math.floor(cluster / g.refcountsPerBlock));
    return block ? getRefcount(block, cluster % g.refcountsPerBlock, g.refcountOrder) : 0;
  };
  const structureClusters: number[] = [];
  const stored = { table, blocks, structureClusters, get };
  const tableBytes = h.refcountTableClusters * cs;
  if (!refs.add(h.refcountTableOffset, tableBytes, Role.refcountTable, 'refcount table')) return stored;
  for (let k = 0; k < h.refcountTableClusters; k++) structureClusters.push(h.refcountTableOffset / cs + k);
  const raw = await readRegion(input, h.refcountTableOffset, tableBytes);
  const reads: { index: number; offset: number }[] = [];
  for (let i = 0; i < tableBytes / 8; i++) {
    const hi = raw.readUInt32BE(i * 8);
    const lo = raw.readUInt32BE(i * 8 + 4);
    if (hi >= 0x200000) {
      error(`refcount table entry ${i} (0x${raw.readBigUInt64BE(i * 8).toString(16)}) is too large`);
      table.push(0);
      continue;
    }
    const off = hi * 2 ** 32 + lo;
    table.push(off);
    if (off === 0) continue;
    if (off % cs !== 0) {
      error(`refcount block ${i} at ${hex(off)} is not cluster aligned; refcount table entry corrupted`);
      continue;
    }
    if (off >= fileLength) {
      error(`refcount block ${i} at ${hex(off)} is outside the image (${fileLength} bytes)`);
      continue;
    }
    if (!refs.add(off, cs, Role.refcountBlock, `refcount table entry ${i}`)) continue;
    structureClusters.push(off / cs);
    reads.push({ index: i, offset: off });
  }
  await inBatches(reads, async ({ index, offset }) => {
    blocks.set(index, await readRegion(input, offset, cs));
  });
  return stored;
}

/** Counts the bitmap directory, tables and data clusters (qemu's qcow2_check_bitmaps_refcounts). */
async function scanBitmaps(input: ScanInput, refs: References, error: (m: string) => void): Promise<void> {
  const ext = input.extensions.bitmaps;
  // As qemu: with the autoclear bit clear the extension is stale and its clusters are not in use.
  if (!ext || (input.header.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return;
  const { geometry: g, fileLength } = input;
  const cs = g.clusterSize;
  if (!refs.add(ext.directoryOffset, ext.directorySize, Role.bitmapDirectory, 'bitmap directory')) return;
  try {
    const dir = await readRegion(input, ext.directoryOffset, ext.directorySize);
    const entries = decodeBitmapDirectory(dir, ext.nbBitmaps, { diskSize: input.header.size, clusterSize: cs, fileLength });
    for (const entry of entries) {
      const what = `bitmap '${entry.name}'`;
      if (!refs.add(entry.tableOffset, entry.tableSize * 8, Role.bitmapTable, `${what} table`)) continue;
      const table = decodeBitmapTable(await readRegion(input, entry.tableOffset, entry.tableSize * 8), entry.tableSize, cs, fileLength);
      table.forEach((t, i) => {
        if (t.kind === 'data') refs.add(t.offset, cs, Role.bitmapData, `${what} table entry ${i}`);
      });
    }
  } catch (err) {
    error(`bitmaps: ${messageOf(err).replace(/^corrupt qcow2 image: /, '')}`);
  }
}

/** Counts the snapshot table and walks every snapshot's L1 table (qemu's qcow2_check_refcounts). */
async function scanSnapshots(
  input: ScanInput,
  refs: References,
  error: (m: string) => void,
  walkL1: (offset: number, size: number, active: boolean, name: string) => Promise<void>,
): Promise<void> {
  const h = input.header;
  if (h.nbSnapshots === 0) return;
  const cs = input.geometry.clusterSize;
  if (h.snapshotsOffset % cs !== 0) {
    error(`snapshot table at ${hex(h.snapshotsOffset)} is not cluster aligned`);
    return;
  }
  // The table's size is known only by walking it; read up to what 65536 entries could need.
  const want = Math.min(input.fileLength - h.snapshotsOffset, 64 * 1024 * 1024);
  if (want <= 0) {
    error(`snapshot table at ${hex(h.snapshotsOffset)} lies past the end of the file`);
    return;
  }
  const buf = await readRegion(input, h.snapshotsOffset, want);
  const l1s: { offset: number; size: number; name: string }[] = [];
  let at = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (at + SNAPSHOT_FIXED > buf.length) {
      error(`snapshot table truncated at entry ${i}`);
      return;
    }
    const l1Offset = buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
    const l1Size = buf.readUInt32BE(at + 8);
    const idSize = buf.readUInt16BE(at + 12);
    const nameSize = buf.readUInt16BE(at + 14);
    const extra = buf.readUInt32BE(at + 36);
    const end = at + SNAPSHOT_FIXED + extra + idSize + nameSize;
    if (end > buf.length) {
      error(`snapshot table entry ${i} runs past the end of the file`);
      return;
    }
    const id = buf.subarray(at + SNAPSHOT_FIXED + extra, at + SNAPSHOT_FIXED + extra + idSize).toString('utf8');
    l1s.push({ offset: l1Offset, size: l1Size, name: `L1 table of snapshot ${JSON.stringify(id)}` });
    at = Math.ceil(end / 8) * 8;
  }
  refs.add(h.snapshotsOffset, at, Role.snapshotTable, 'snapshot table');
  for (const s of l1s) await walkL1(s.offset, s.size, false, s.name);
}
