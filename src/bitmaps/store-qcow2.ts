/**
 * BitmapStore inside a qcow2 image: the qcow2 bitmaps extension, read and written compatibly with
 * QEMU (`qemu-img info` lists the bitmaps, `qemu-nbd -B` exports them, `qemu-img bitmap` edits
 * them). See docs/sidecar.md, "Relation to qcow2's in_use flag".
 *
 * Layout policy: every enabled bitmap has a data cluster for every table entry (zero-filled where
 * clean), so write-intent is a durable write into a fixed cluster (`FilePort.writeDurable`: synced
 * by range, not an fdatasync of the whole image) — no allocation or metadata change on the write
 * path. Disabled bitmaps get data clusters only where bits are set.
 * `in_use` stays clear while nbdd runs (the bits on disk are never behind the image) and the
 * bitmaps autoclear bit stays set.
 *
 * Metadata changes (add, remove, enable, disable, clear, merge) write the changed bitmap's new
 * table and data clusters and a new directory to newly allocated clusters (the other bitmaps keep
 * theirs), make them and their refcounts durable, switch the header extension to the new
 * directory (durable), then free what the set no longer uses — QEMU's order for storing bitmaps
 * (update_ext_header_and_dir). A crash leaves the old or the new set referenced, and at worst
 * leaked clusters.
 */
import { Errno, NbddError, assert } from '../core/errors.js';
import { logger } from '../core/log.js';
import type { FilePiece, FilePort } from '../io/file-port.js';
import { DirtyBitmap, granularityBits } from './dirty-bitmap.js';
import {
  BITMAP_AUTO,
  BITMAP_IN_USE,
  bitmapDataCluster,
  decodeBitmapDirectory,
  decodeBitmapTable,
  encodeBitmapDirectory,
  encodeBitmapTable,
  loadBitmapData,
  tableSizeFor,
  type BitmapsExtension,
  type Qcow2BitmapEntry,
  type TableEntry,
} from '../backends/qcow2/format/bitmaps.js';
import { OpChain, type BitmapMeta, type BitmapStore, type BitsChange, type StoredBitmap } from './store.js';

const log = logger('bitmaps');

/** Where a qcow2 image's stored bitmaps are read from (Qcow2Image.bitmapSource(), also read-only). */
export interface Qcow2BitmapSource {
  readonly path: string;
  readonly port: FilePort;
  readonly clusterSize: number;
  readonly diskSize: number;
  /** The bitmaps extension found at open, if any. */
  readonly bitmapsExtension: BitmapsExtension | null;
  /** The bitmaps autoclear bit as found at open (false: a program without bitmap support wrote the image). */
  readonly bitmapsConsistentAtOpen: boolean;
}

/** What the store needs from a writable qcow2 image (Qcow2Image.bitmapHost()). */
export interface Qcow2BitmapHost extends Qcow2BitmapSource {
  /** `n` contiguous clusters with refcount 1 (in memory until `commitMetadata`); host offset. */
  allocateClusters(n: number): number;
  /** Drops one reference to each of `n` clusters at `offset` at the next commit. */
  freeClusters(offset: number, n: number): void;
  /** Makes refcount changes (and frees) durable. */
  commitMetadata(): Promise<void>;
  /** Points the header at `ext` (or removes it) and sets the autoclear bit to match; durable. */
  writeBitmapsExtension(ext: BitmapsExtension | null): Promise<void>;
}

/** One bitmap as read from the image: where its table is, and its bits when it is consistent. */
interface ReadBitmap {
  entry: Qcow2BitmapEntry;
  table: TableEntry[];
  /** Null for an inconsistent bitmap (in_use, or the autoclear bit was clear): it may miss writes. */
  bits: DirtyBitmap | null;
}

/** Reads the bitmap directory, every table, and the bits of every consistent bitmap (warning about the others). */
async function readBitmaps(src: Qcow2BitmapSource): Promise<ReadBitmap[]> {
  const ext = src.bitmapsExtension;
  if (!ext) return [];
  const cs = src.clusterSize;
  const fileLength = await src.port.length();
  const dir = await src.port.readAt(Buffer.alloc(ext.directorySize), ext.directoryOffset);
  const out: ReadBitmap[] = [];
  for (const entry of decodeBitmapDirectory(dir, ext.nbBitmaps, { diskSize: src.diskSize, clusterSize: cs, fileLength })) {
    const table = decodeBitmapTable(await src.port.readAt(Buffer.alloc(entry.tableSize * 8), entry.tableOffset), entry.tableSize, cs, fileLength);
    if (!src.bitmapsConsistentAtOpen || entry.flags & BITMAP_IN_USE) {
      log.warn(`${src.path}: bitmap '${entry.name}' is inconsistent (${entry.flags & BITMAP_IN_USE ? 'in_use' : 'written without bitmap support'}); dropping it`);
      out.push({ entry, table, bits: null });
      continue;
    }
    const bits = new DirtyBitmap(src.diskSize, 2 ** entry.granularityBits);
    await loadBitmapData(bits, table, cs, (off) => src.port.readAt(Buffer.alloc(cs), off));
    out.push({ entry, table, bits });
  }
  return out;
}

/**
 * The consistent bitmaps of an image open read-only, as they are stored: nothing is written (no
 * `in_use`, no autoclear change), so a quiesced image can be exported with its bitmaps the way
 * `qemu-nbd -r -B NAME` does.
 */
export async function readStoredBitmaps(src: Qcow2BitmapSource): Promise<StoredBitmap[]> {
  return (await readBitmaps(src)).flatMap(({ entry, bits }) => (bits ? [{ ...metaOf(entry), bits }] : []));
}

interface Placed {
  meta: BitmapMeta;
  tableOffset: number;
  table: TableEntry[];
}

export class Qcow2BitmapStore implements BitmapStore {
  readonly kind = 'qcow2';
  private placed = new Map<string, Placed>();
  private directory: { offset: number; size: number } | null = null;
  private readonly bits = new Map<string, DirtyBitmap>();
  private readonly chain = new OpChain();
  private readonly cs: number;

  constructor(private readonly host: Qcow2BitmapHost) {
    this.cs = host.clusterSize;
  }

  get location(): string {
    return this.host.path;
  }

  /**
   * Loads the image's consistent bitmaps (those with `in_use` set, or all of them when the
   * autoclear bit was clear at open, are dropped with a warning: they may miss writes), then
   * rewrites them in nbdd's layout so recording can start.
   */
  load(): Promise<StoredBitmap[]> {
    return this.chain.run(async () => {
      const ext = this.host.bitmapsExtension;
      const out: StoredBitmap[] = [];
      if (ext) {
        this.directory = { offset: ext.directoryOffset, size: ext.directorySize };
        for (const { entry, table, bits } of await readBitmaps(this.host)) {
          this.placed.set(entry.name, { meta: metaOf(entry), tableOffset: entry.tableOffset, table });
          if (!bits) continue;
          this.bits.set(entry.name, bits);
          out.push({ ...metaOf(entry), bits });
        }
        // Only bitmaps not yet in nbdd's layout (an enabled one without a data cluster for every
        // entry, as QEMU writes them) get new clusters; the dropped ones leave the directory.
        const relayout = out.filter((b) => b.enabled && this.placed.get(b.name)!.table.some((e) => e.kind !== 'data')).map((b) => b.name);
        if (relayout.length > 0 || out.length < this.placed.size) await this.rewrite(out.map(({ name, granularity, enabled }) => ({ name, granularity, enabled })), relayout);
      }
      return out;
    });
  }

  add(meta: BitmapMeta, bits: DirtyBitmap): Promise<void> {
    return this.chain.run(async () => {
      if (this.placed.has(meta.name)) throw new NbddError(Errno.EEXIST, `bitmap '${meta.name}' is already stored`);
      granularityBits(meta.granularity);
      this.bits.set(meta.name, bits);
      await this.rewrite([...this.metas(), meta], [meta.name]);
    });
  }

  remove(name: string): Promise<void> {
    return this.chain.run(async () => {
      this.entry(name);
      this.bits.delete(name);
      await this.rewrite(this.metas().filter((m) => m.name !== name), []);
    });
  }

  setEnabled(name: string, enabled: boolean): Promise<void> {
    return this.chain.run(async () => {
      if (this.entry(name).meta.enabled === enabled) return;
      // A disabled bitmap keeps its clusters; an enabled one needs a data cluster for every entry.
      await this.rewrite(this.metas().map((m) => (m.name === name ? { ...m, enabled } : m)), enabled ? [name] : []);
    });
  }

  writeBits(changes: BitsChange[]): Promise<void> {
    return this.chain.run(async () => {
      const writes: FilePiece[] = [];
      for (const change of changes) {
        const p = this.placed.get(change.name);
        if (!p) continue;
        for (const run of change.runs) {
          const { first, end } = DirtyBitmap.bytesOf(run);
          // Split at data-cluster boundaries of the serialized bits.
          for (let at = first; at < end; ) {
            const i = Math.floor(at / this.cs);
            const stop = Math.min(end, (i + 1) * this.cs);
            const e = p.table[i]!;
            if (e.kind !== 'data') {
              // Only a bitmap recorded as disabled lacks data clusters; store it anew.
              await this.rewrite(this.metas(), [change.name]);
              return;
            }
            writes.push({ buf: Buffer.from(change.bits.view(at, stop)), offset: e.offset + (at - i * this.cs) });
            at = stop;
          }
        }
      }
      // Durable before the writes they cover go on; synced by range where the port can, so the
      // image's dirty data pages are not written back with them (docs/sidecar.md, write-intent).
      await this.host.port.writeDurable(writes);
    });
  }

  writeAll(name: string, bits: DirtyBitmap): Promise<void> {
    return this.chain.run(async () => {
      this.entry(name);
      this.bits.set(name, bits);
      await this.rewrite(this.metas(), [name]);
    });
  }

  /**
   * Clean close: the exact bits replace the intent regions write-intent stored (BitmapSet,
   * INTENT_REGION) — in place, cluster by cluster where they differ, so a crash half way leaves
   * each cluster either exact or the superset it was — then a last sync.
   */
  close(bitmaps: StoredBitmap[]): Promise<void> {
    return this.chain.run(async () => {
      const writes: FilePiece[] = [];
      for (const b of bitmaps) {
        const p = this.placed.get(b.name);
        const stored = this.bits.get(b.name);
        if (!p || !stored || stored === b.bits) continue;
        for (let i = 0; i < p.table.length; i++) {
          const first = i * this.cs;
          const end = Math.min(first + this.cs, b.bits.byteLength);
          const exact = b.bits.view(first, end);
          if (Buffer.compare(exact, stored.view(first, end)) === 0) continue;
          const e = p.table[i]!;
          // A cluster without data is clean in the stored bits, so in the exact ones (a subset).
          // Were it not, failing here leaves the stored superset on disk: nothing is lost.
          assert(e.kind === 'data', `bitmap '${b.name}': exact bits where the stored ones are clean`);
          writes.push({ buf: Buffer.from(exact), offset: e.offset });
        }
        this.bits.set(b.name, b.bits);
      }
      await Promise.all(writes.map((w) => this.host.port.writeAt(w.buf, w.offset)));
      await this.host.port.fsync();
    });
  }

  /* ------------------------------------------------------------ internals */

  private metas(): BitmapMeta[] {
    return [...this.placed.values()].filter((p) => this.bits.has(p.meta.name)).map((p) => p.meta);
  }

  private entry(name: string): Placed {
    const p = this.placed.get(name);
    if (!p || !this.bits.has(name)) throw new NbddError(Errno.ENOENT, `bitmap '${name}' is not stored in ${this.host.path}`);
    return p;
  }

  /**
   * Stores the set `metas`: the bitmaps named in `fresh` (and any not stored yet) get a new table
   * and data clusters from `this.bits`, the others keep theirs; a new directory names them all,
   * the header switches to it, and then what no longer belongs to the set is freed. So adding,
   * removing or flipping one bitmap costs that bitmap and the directory, not every bitmap.
   */
  private async rewrite(metas: BitmapMeta[], fresh: string[]): Promise<void> {
    const { port } = this.host;
    const cs = this.cs;
    const old = { placed: [...this.placed.values()], directory: this.directory };
    const placed = new Map<string, Placed>();
    const writes: Promise<void>[] = [];
    for (const meta of metas) {
      const kept = this.placed.get(meta.name);
      if (kept && !fresh.includes(meta.name)) {
        placed.set(meta.name, { ...kept, meta });
        continue;
      }
      const bits = this.bits.get(meta.name)!;
      const size = tableSizeFor(this.host.diskSize, meta.granularity, cs);
      const table: TableEntry[] = [];
      for (let i = 0; i < size; i++) {
        const data = bitmapDataCluster(bits, i, cs);
        if (!data && !meta.enabled) {
          table.push({ kind: 'zeros' });
          continue;
        }
        const offset = this.host.allocateClusters(1);
        writes.push(port.writeAt(data ?? Buffer.alloc(cs), offset));
        table.push({ kind: 'data', offset });
      }
      const tableClusters = Math.max(1, Math.ceil((size * 8) / cs));
      const tableOffset = this.host.allocateClusters(tableClusters);
      writes.push(port.writeAt(padTo(encodeBitmapTable(table), tableClusters * cs), tableOffset));
      placed.set(meta.name, { meta, tableOffset, table });
    }
    let directory: { offset: number; size: number } | null = null;
    if (placed.size > 0) {
      const entries: Qcow2BitmapEntry[] = [...placed.values()].map((p) => ({
        tableOffset: p.tableOffset,
        tableSize: p.table.length,
        flags: p.meta.enabled ? BITMAP_AUTO : 0,
        granularityBits: granularityBits(p.meta.granularity),
        name: p.meta.name,
      }));
      const dir = encodeBitmapDirectory(entries);
      const clusters = Math.ceil(dir.length / cs);
      directory = { offset: this.host.allocateClusters(clusters), size: dir.length };
      writes.push(port.writeAt(padTo(dir, clusters * cs), directory.offset));
    }
    await Promise.all(writes);
    await port.fsync(); // new clusters' contents before the refcounts and header that use them
    await this.host.commitMetadata();
    await this.host.writeBitmapsExtension(directory ? { nbBitmaps: placed.size, directorySize: directory.size, directoryOffset: directory.offset } : null);
    this.placed = placed;
    this.directory = directory;
    for (const p of old.placed) {
      if (placed.get(p.meta.name)?.tableOffset === p.tableOffset) continue; // kept
      for (const e of p.table) if (e.kind === 'data') this.host.freeClusters(e.offset, 1);
      this.host.freeClusters(p.tableOffset, Math.max(1, Math.ceil((p.table.length * 8) / cs)));
    }
    if (old.directory) this.host.freeClusters(old.directory.offset, Math.ceil(old.directory.size / cs));
    await this.host.commitMetadata();
  }
}

function metaOf(e: Qcow2BitmapEntry): BitmapMeta {
  return { name: e.name, granularity: 2 ** e.granularityBits, enabled: (e.flags & BITMAP_AUTO) !== 0 };
}

function padTo(b: Buffer, length: number): Buffer {
  if (b.length === length) return b;
  const out = Buffer.alloc(length);
  b.copy(out);
  return out;
}
