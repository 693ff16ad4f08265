/**
 * Where copy-before-write keeps the old contents of granules while a backup runs: memory up to a
 * limit, then an unlinked temporary file up to a second limit. Past both, `put` fails with
 * ENOSPC and stores nothing (the caller decides what breaks; nothing is dropped silently).
 *
 * Buffers: `put` copies nothing and keeps `data` (the caller hands it over); `get` returns the
 * kept buffer or a fresh one read from the file — callers must not modify it.
 */
import { requestBuffers } from '../core/request-buffers.js';
import { promises as fsp, constants as fsConstants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { lazyBuiltin } from '../core/lazy-builtin.js';
import { Errno, NbddError, assert } from '../core/errors.js';

export interface ScratchLimits {
  /** Bytes kept in memory before spilling to the file (default 64 MiB). */
  memoryBytes: number;
  /** Bytes the temporary file may hold (default 1 GiB; 0 disables the file). */
  fileBytes: number;
  /** Directory for the temporary file (default the OS temp dir). */
  dir: string;
}

export const DEFAULT_SCRATCH_LIMITS: ScratchLimits = {
  memoryBytes: 64 * 1024 * 1024,
  fileBytes: 1024 * 1024 * 1024,
  dir: tmpdir(),
};

type Slot = { where: 'memory'; data: Buffer } | { where: 'file'; slot: number; length: number };

export class ScratchStore {
  private readonly slots = new Map<number, Slot>();
  private readonly limits: ScratchLimits;
  private memoryUsed = 0;
  private file: FileHandle | null = null;
  private fileOpening: Promise<FileHandle> | null = null;
  private fileSlots = 0;
  private readonly freeFileSlots: number[] = [];
  private closed = false;

  /** `slotSize`: the largest buffer ever `put` (one granule). */
  constructor(
    private readonly slotSize: number,
    limits: Partial<ScratchLimits> = {},
  ) {
    this.limits = { ...DEFAULT_SCRATCH_LIMITS, ...limits };
  }

  has(key: number): boolean {
    return this.slots.has(key);
  }

  get count(): number {
    return this.slots.size;
  }

  get memoryBytes(): number {
    return this.memoryUsed;
  }

  get fileBytes(): number {
    return (this.fileSlots - this.freeFileSlots.length) * this.slotSize;
  }

  /** Keeps `data` under `key` (not present yet). Throws ENOSPC when both limits are reached. */
  async put(key: number, data: Buffer): Promise<void> {
    assert(!this.slots.has(key) && data.length <= this.slotSize, 'scratch put of a new key within the slot size');
    if (this.closed) throw new NbddError(Errno.ESHUTDOWN, 'the scratch store is closed');
    if (this.memoryUsed + data.length <= this.limits.memoryBytes) {
      this.memoryUsed += data.length;
      requestBuffers.keep(data); // held until the backup ends, and served by view READs meanwhile
      this.slots.set(key, { where: 'memory', data });
      return;
    }
    const slot = this.freeFileSlots.pop() ?? ((this.fileSlots + 1) * this.slotSize <= this.limits.fileBytes ? this.fileSlots++ : -1);
    if (slot < 0) {
      throw new NbddError(
        Errno.ENOSPC,
        `backup scratch space is full (${this.limits.memoryBytes} bytes in memory, ${this.limits.fileBytes} in ${this.limits.dir})`,
      );
    }
    try {
      const file = await this.openFile();
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await file.write(data, done, data.length - done, slot * this.slotSize + done);
        done += bytesWritten;
      }
    } catch (err) {
      this.freeFileSlots.push(slot);
      throw err;
    }
    this.slots.set(key, { where: 'file', slot, length: data.length });
  }

  /** The data kept under `key`. Throws ENOENT if there is none. */
  async get(key: number): Promise<Buffer> {
    const s = this.slots.get(key);
    if (!s) throw new NbddError(Errno.ENOENT, `no scratch copy of granule ${key}`);
    if (s.where === 'memory') return s.data;
    const buf = Buffer.alloc(s.length);
    let done = 0;
    while (done < s.length) {
      const { bytesRead } = await this.file!.read(buf, done, s.length - done, s.slot * this.slotSize + done);
      if (bytesRead === 0) throw new NbddError(Errno.EIO, 'scratch file truncated');
      done += bytesRead;
    }
    return buf;
  }

  delete(key: number): void {
    const s = this.slots.get(key);
    if (!s) return;
    this.slots.delete(key);
    if (s.where === 'memory') this.memoryUsed -= s.data.length;
    else this.freeFileSlots.push(s.slot);
  }

  /** Drops everything and closes (and so frees) the temporary file. */
  async close(): Promise<void> {
    this.closed = true;
    this.slots.clear();
    this.memoryUsed = 0;
    const file = this.file ?? (this.fileOpening ? await this.fileOpening.catch(() => null) : null);
    this.file = null;
    await file?.close();
  }

  private openFile(): Promise<FileHandle> {
    if (this.file) return Promise.resolve(this.file);
    this.fileOpening ??= (async () => {
      const path = join(this.limits.dir, `nbdd-scratch-${process.pid}-${randomSuffix()}`);
      const file = await fsp.open(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
      await fsp.unlink(path); // anonymous from now on: freed when closed, even after a crash
      this.file = file;
      return file;
    })();
    return this.fileOpening;
  }
}

/** `node:crypto`, loaded with the first scratch file. */
const nodeCrypto = lazyBuiltin<typeof import('node:crypto')>('node:crypto');

/** Twelve random hex digits for a scratch file's name. */
function randomSuffix(): string {
  return nodeCrypto().randomBytes(6).toString('hex');
}
