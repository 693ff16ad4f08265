/**
 * BitmapStore in a sidecar file (raw images, remote backends): see sidecar-format.ts for the
 * layout and docs/sidecar.md for the guarantees.
 *
 * - Bits are updated in place: `writeBits` writes only the bytes holding newly dirtied granules,
 *   then one fdatasync for the whole batch.
 * - Metadata changes (add, remove, enable, disable) write a complete new file beside the old one,
 *   sync it, and rename it over the old one (then sync the directory), so a crash leaves either
 *   the old or the new file, never a mix. Such changes are rare; the file is small (2 MiB per
 *   bitmap of a 1 TiB disk at 64 KiB).
 * - The file is created at the first `add`, and held with an exclusive flock while open, so two
 *   daemons cannot record into the same bitmaps.
 */
import { promises as fsp, constants as fsConstants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Errno, NbddError } from '../core/errors.js';
import { LOCK_EX, tryFlock } from '../sys/libc.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import {
  HEADER_LENGTH,
  decodeDirectory,
  decodeHeader,
  encodeHeader,
  layoutSidecar,
  type SidecarEntry,
} from './sidecar-format.js';
import { OpChain, type BitmapMeta, type BitmapStore, type BitsChange, type StoredBitmap } from './store.js';

/** The default sidecar path for an image file. */
export function defaultSidecarPath(imagePath: string): string {
  return `${imagePath}.nbdd-bitmaps`;
}

export class SidecarFileStore implements BitmapStore {
  readonly kind = 'sidecar-file';
  private handle: FileHandle | null;
  private entries = new Map<string, SidecarEntry>();
  private readonly bits = new Map<string, DirtyBitmap>();
  private readonly chain = new OpChain();
  private closed = false;

  private constructor(
    readonly location: string,
    private readonly diskSize: number,
    handle: FileHandle | null,
  ) {
    this.handle = handle;
  }

  /**
   * Opens (without creating) the sidecar file at `path` for a disk of `diskSize` bytes and locks
   * it. Throws EBUSY if another process holds it, EUCLEAN if it is malformed, EINVAL if it was
   * made for a disk of another size.
   */
  static async open(path: string, diskSize: number): Promise<SidecarFileStore> {
    let handle: FileHandle;
    try {
      handle = await fsp.open(path, fsConstants.O_RDWR);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new SidecarFileStore(path, diskSize, null);
      throw err;
    }
    const store = new SidecarFileStore(path, diskSize, handle);
    try {
      if (!tryFlock(handle.fd, LOCK_EX)) throw new NbddError(Errno.EBUSY, `${path} is in use by another process`);
      await store.readDirectory(handle);
    } catch (err) {
      await handle.close();
      throw err;
    }
    return store;
  }

  private async readDirectory(handle: FileHandle): Promise<void> {
    const fileLength = (await handle.stat()).size;
    const head = Buffer.alloc(HEADER_LENGTH);
    await readFull(handle, head, 0);
    const header = decodeHeader(head);
    if (header.diskSize !== this.diskSize) {
      throw new NbddError(Errno.EINVAL, `${this.location} holds bitmaps of a ${header.diskSize}-byte disk, but the disk has ${this.diskSize} bytes`);
    }
    const dir = Buffer.alloc(header.directoryLength);
    await readFull(handle, dir, header.directoryOffset);
    for (const e of decodeDirectory(dir, header, fileLength)) this.entries.set(e.name, e);
  }

  load(): Promise<StoredBitmap[]> {
    return this.chain.run(async () => {
      const out: StoredBitmap[] = [];
      for (const e of this.entries.values()) {
        const bits = new DirtyBitmap(this.diskSize, e.granularity);
        const data = Buffer.alloc(e.dataLength);
        await readFull(this.handle!, data, e.dataOffset);
        bits.load(data);
        this.bits.set(e.name, bits);
        out.push({ name: e.name, granularity: e.granularity, enabled: e.enabled, bits });
      }
      return out;
    });
  }

  add(meta: BitmapMeta, bits: DirtyBitmap): Promise<void> {
    return this.chain.run(async () => {
      if (this.entries.has(meta.name)) throw new NbddError(Errno.EEXIST, `bitmap '${meta.name}' is already stored`);
      const metas = [...this.metas(), { name: meta.name, granularity: meta.granularity, enabled: meta.enabled }];
      await this.rewrite(metas, new Map([...this.bits, [meta.name, bits]]));
    });
  }

  remove(name: string): Promise<void> {
    return this.chain.run(async () => {
      this.entry(name);
      const bits = new Map(this.bits);
      bits.delete(name);
      await this.rewrite(this.metas().filter((m) => m.name !== name), bits);
    });
  }

  setEnabled(name: string, enabled: boolean): Promise<void> {
    return this.chain.run(async () => {
      if (this.entry(name).enabled === enabled) return;
      await this.rewrite(this.metas().map((m) => (m.name === name ? { ...m, enabled } : m)), this.bits);
    });
  }

  writeBits(changes: BitsChange[]): Promise<void> {
    return this.chain.run(async () => {
      const handle = this.open();
      const writes: Promise<unknown>[] = [];
      for (const change of changes) {
        const e = this.entries.get(change.name);
        if (!e) continue;
        for (const { first, end } of byteSpans(change.runs)) {
          // A copy: the bitmap may gain bits while the write is queued, which is harmless, but a
          // concurrent clear must not race with the bytes in flight.
          const data = Buffer.from(change.bits.view(first, end));
          writes.push(writeFull(handle, data, e.dataOffset + first));
        }
      }
      await Promise.all(writes);
      await handle.datasync();
    });
  }

  writeAll(name: string, bits: DirtyBitmap): Promise<void> {
    return this.chain.run(async () => {
      const handle = this.open();
      const e = this.entry(name);
      await writeFull(handle, Buffer.from(bits.view()), e.dataOffset);
      await handle.datasync();
    });
  }

  close(bitmaps: StoredBitmap[]): Promise<void> {
    return this.chain.run(async () => {
      if (this.closed) return;
      this.closed = true;
      const handle = this.handle;
      if (!handle) return;
      for (const b of bitmaps) {
        const e = this.entries.get(b.name);
        if (e) await writeFull(handle, Buffer.from(b.bits.view()), e.dataOffset);
      }
      await handle.datasync();
      await handle.close();
      this.handle = null;
    });
  }

  /* ------------------------------------------------------------ internals */

  private metas(): BitmapMeta[] {
    return [...this.entries.values()].map((e) => ({ name: e.name, granularity: e.granularity, enabled: e.enabled }));
  }

  private entry(name: string): SidecarEntry {
    const e = this.entries.get(name);
    if (!e) throw new NbddError(Errno.ENOENT, `bitmap '${name}' is not stored in ${this.location}`);
    return e;
  }

  private open(): FileHandle {
    if (this.closed || !this.handle) throw new NbddError(Errno.EBADF, `${this.location} is not open`);
    return this.handle;
  }

  /** Writes a complete new file for `metas` and renames it over the old one. */
  private async rewrite(metas: BitmapMeta[], bits: Map<string, DirtyBitmap>): Promise<void> {
    if (this.closed) throw new NbddError(Errno.EBADF, `${this.location} is closed`);
    const layout = layoutSidecar(this.diskSize, metas);
    const tmp = `${this.location}.tmp`;
    const handle = await fsp.open(tmp, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
    try {
      if (!tryFlock(handle.fd, LOCK_EX)) throw new NbddError(Errno.EBUSY, `${tmp} is in use by another process`);
      await handle.truncate(layout.fileLength);
      await writeFull(handle, Buffer.concat([encodeHeader(layout.header), layout.directory]), 0);
      for (const e of layout.entries) {
        const b = bits.get(e.name);
        if (b) await writeFull(handle, Buffer.from(b.view()), e.dataOffset);
      }
      await handle.datasync();
      await fsp.rename(tmp, this.location);
      await syncDirectory(dirname(this.location));
    } catch (err) {
      await handle.close();
      await fsp.rm(tmp, { force: true });
      throw err;
    }
    await this.handle?.close();
    this.handle = handle;
    this.entries = new Map(layout.entries.map((e) => [e.name, e]));
    this.bits.clear();
    for (const [name, b] of bits) if (this.entries.has(name)) this.bits.set(name, b);
  }
}

/** Merged byte spans `[first, end)` of the serialized bitmap holding `runs`. */
function byteSpans(runs: { first: number; count: number }[]): { first: number; end: number }[] {
  const spans = runs.map((r) => DirtyBitmap.bytesOf(r)).sort((a, b) => a.first - b.first);
  const out: { first: number; end: number }[] = [];
  for (const s of spans) {
    const last = out[out.length - 1];
    if (last && s.first <= last.end) last.end = Math.max(last.end, s.end);
    else out.push({ ...s });
  }
  return out;
}

async function readFull(handle: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await handle.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new NbddError(Errno.EUCLEAN, `unexpected end of file at ${position + done}`);
    done += bytesRead;
  }
}

async function writeFull(handle: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await handle.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

async function syncDirectory(path: string): Promise<void> {
  const dir = await fsp.open(path, fsConstants.O_RDONLY);
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
