/**
 * The named dirty bitmaps of one disk: the operations the control socket offers (add, remove,
 * clear, enable, disable, merge, checkpoint, list) and the write-intent bookkeeping the
 * dirty-tracking layer relies on.
 *
 * Write-intent (see docs/sidecar.md, "Crash safety"): `mark(offset, length)` sets the bits of
 * every enabled bitmap in memory and returns a promise the caller must await before issuing the
 * write that dirtied them. A persistent bitmap has two sets of bits: `bits`, exactly the
 * granules written (what the sidecar serves, backups read and a clean close stores), and
 * `durable`, what the store holds meanwhile — a superset that grows by whole intent regions
 * (INTENT_REGION bytes): the first write into a region makes the whole region dirty on disk, so
 * later first touches in it need no store write at all. Newly covered regions are gathered until
 * the end of the current event-loop turn (all requests of one batch arrive in one turn), then one
 * `store.writeBits` (one write per touched span + one sync) covers them all; while it runs,
 * later turns gather into the next one (group commit). A write whose granules are all dirty
 * already waits only if a store operation that may still be adding those bits is in flight —
 * in the steady state `mark` returns `null` and costs one bitmap scan.
 *
 * With several bitmaps enabled, that one scan is of the summary: the granules (at the finest
 * enabled granularity) dirty in every enabled bitmap. A write wholly inside it changes no bitmap,
 * so the steady state costs the same with 64 bitmaps as with one. The summary only ever
 * understates: it is dropped whenever an enabled bitmap may lose bits or a bitmap starts
 * recording (clear, add, enable, checkpoint), and built again by the writes that follow.
 *
 * The set is the only writer of the in-memory bits; the store only reads them.
 */
import { afterBatch } from '../core/batch.js';
import { EventEmitter } from 'node:events';
import { Errno, NbddError } from '../core/errors.js';
import { logger } from '../core/log.js';
import { formatSize } from '../core/units.js';
import { BITMAP_LIMITS, DEFAULT_GRANULARITY, DirtyBitmap, granularityBits, type GranuleRun } from './dirty-bitmap.js';
import type { BitmapStore, BitsChange, StoredBitmap } from './store.js';

const log = logger('bitmaps');

/**
 * The unit in which write-intent grows a persistent bitmap on disk while the device runs: the
 * first write into a 4 MiB region marks the whole region there (md-raid's bitmap chunk, smaller).
 * After a crash a bitmap may so claim up to a region more per region written (an incremental
 * backup copies that much more); a clean close stores the exact bits.
 */
export const INTENT_REGION = 4 * 1024 * 1024;

/** Longest bitmap name in UTF-8 bytes (qcow2's limit, QEMU's BME_MAX_NAME_SIZE). */
export const MAX_BITMAP_NAME_BYTES = 1023;

/**
 * How many bitmaps a device keeps and how much memory their bits take. A write into granules not
 * yet dirty in every enabled bitmap marks each of them, so the count bounds the write path's
 * cost; qcow2 itself allows 65535.
 */
export interface BitmapSetLimits {
  maxBitmaps: number;
  /** Bits of all bitmaps together, in bytes. */
  maxMemoryBytes: number;
}

export const DEFAULT_BITMAP_LIMITS: BitmapSetLimits = { maxBitmaps: 256, maxMemoryBytes: 1024 * 1024 * 1024 };

export interface OpenSetOptions extends Partial<BitmapSetLimits> {
  /** Bitmaps to start with that nothing stores (a read-only image's). */
  transient?: StoredBitmap[];
  /** Bytes by which write-intent grows a bitmap on disk (default INTENT_REGION; 0: the granule). */
  intentRegion?: number;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  enabled: boolean;
  persistent: boolean;
  /** Held by a running backup (frozen): not changed by writes, not removable. */
  busy: boolean;
  /** Dirty bytes (granules × granularity, clipped at the disk end). */
  dirtyBytes: number;
}

export interface AddOptions {
  granularity?: number;
  /** Default true. */
  enabled?: boolean;
  /** Kept in the store (default: true when the set has a store). */
  persistent?: boolean;
}

interface Entry {
  name: string;
  /** The granules written since the last clear: what is served, frozen and stored at close. */
  bits: DirtyBitmap;
  /**
   * A persistent bitmap's bits as the store has them (the object the store was given or loaded):
   * ⊇ `bits`, grown by whole intent regions. `bits` itself for a transient bitmap.
   */
  durable: DirtyBitmap;
  enabled: boolean;
  persistent: boolean;
  busy: boolean;
}

/**
 * Events: `dirty` (offset, length) for every marked range, emitted only when someone listens;
 * `persist-error` (Error) when marks could not be stored (the writes concerned fail with EIO).
 */
export class BitmapSet extends EventEmitter {
  readonly size: number;
  readonly store: BitmapStore | null;
  private readonly entries = new Map<string, Entry>();
  /** Reused by `mark` (the hot path allocates nothing when no granule turns dirty). */
  private readonly scratchRuns: GranuleRun[] = [];
  private readonly scratchDurable: GranuleRun[] = [];
  /**
   * Granules dirty in every enabled bitmap (see the file comment), at a granularity no coarser
   * than any enabled bitmap's; null while there is none (fewer than two enabled, or no room),
   * undefined until `newSummary` decides again after a drop.
   */
  private summary: DirtyBitmap | null | undefined = undefined;

  /** Runs gathered in this turn for the next `writeBits`. */
  private pendingChanges = new Map<string, { entry: Entry; runs: GranuleRun[] }>();
  /** Resolves when the pending changes are durable; null when none are pending. */
  private pendingDurable: Promise<void> | null = null;
  /** Store operations started and not yet settled (intent writes, clears, merges, …). */
  private storeOpsInFlight = 0;
  private lastStoreOp: Promise<void> = Promise.resolve();
  /** Set when an intent write failed; its runs stay pending and every writer waits for the retry. */
  private failed = false;

  private constructor(
    size: number,
    store: BitmapStore | null,
    readonly limits: BitmapSetLimits,
    private readonly intentRegion: number,
  ) {
    super();
    this.size = size;
    this.store = store;
  }

  /**
   * A set over `store` (or transient only, when null), with the stored bitmaps loaded (whatever
   * the limits: they exist already), plus `options.transient` bitmaps to start with.
   */
  static async open(size: number, store: BitmapStore | null, options: OpenSetOptions = {}): Promise<BitmapSet> {
    const { transient = [], intentRegion = INTENT_REGION, ...limits } = options;
    const set = new BitmapSet(size, store, { ...DEFAULT_BITMAP_LIMITS, ...limits }, intentRegion);
    for (const b of store ? await store.load() : []) {
      set.entries.set(b.name, { name: b.name, bits: b.bits.copy(), durable: b.bits, enabled: b.enabled, persistent: true, busy: false });
    }
    for (const b of transient) {
      if (set.entries.has(b.name)) throw new NbddError(Errno.EEXIST, `bitmap '${b.name}' is stored twice`);
      set.entries.set(b.name, { name: b.name, bits: b.bits, durable: b.bits, enabled: b.enabled, persistent: false, busy: false });
    }
    return set;
  }

  /* ------------------------------------------------------------ queries */

  has(name: string): boolean {
    return this.entries.has(name);
  }

  /** The bits of bitmap `name` (the live object: read it, do not change it). Throws ENOENT. */
  bits(name: string): DirtyBitmap {
    return this.entry(name).bits;
  }

  list(): BitmapInfo[] {
    return [...this.entries.values()].map((e) => this.info(e));
  }

  info(e: Entry | string): BitmapInfo {
    const entry = typeof e === 'string' ? this.entry(e) : e;
    const { bits } = entry;
    let dirtyBytes = bits.count() * bits.granularity;
    if (bits.granules > 0 && bits.get(bits.granules - 1)) dirtyBytes -= bits.granules * bits.granularity - this.size;
    return {
      name: entry.name,
      granularity: bits.granularity,
      enabled: entry.enabled,
      persistent: entry.persistent,
      busy: entry.busy,
      dirtyBytes,
    };
  }

  /* ------------------------------------------------------------ write path */

  /**
   * Marks `[offset, offset+length)` dirty in every enabled bitmap. Returns null when the write
   * may proceed at once, else a promise that resolves when the marks are durable (rejects with
   * the store's error if they could not be made durable: the write must then fail).
   */
  mark(offset: number, length: number): Promise<void> | null {
    const summary = this.summary === undefined ? this.newSummary() : this.summary;
    let wait: Promise<void> | null = null;
    if (!summary?.allDirty(offset, length)) {
      wait = this.markEach(offset, length);
      // Every enabled bitmap now has every granule touching the range (each granule of the
      // summary lies inside one of theirs).
      summary?.setRange(offset, length);
    }
    if (this.listenerCount('dirty') > 0) this.emit('dirty', offset, length);
    if (wait) return wait;
    if (this.failed) return this.schedulePending(); // retry the failed bits before this write
    return this.pendingDurable ?? (this.storeOpsInFlight > 0 ? this.lastStoreOp : null);
  }

  /** Marks the range in each enabled bitmap; the intent write to wait for when a region is new to the store. */
  private markEach(offset: number, length: number): Promise<void> | null {
    let wait: Promise<void> | null = null;
    const runs = this.scratchRuns;
    for (const e of this.entries.values()) {
      if (!e.enabled) continue;
      runs.length = 0;
      if (e.bits.markRange(offset, length, runs) > 0 && e.persistent && this.store) {
        // Newly dirty granules: durable already, unless their region is new to the store.
        const region = Math.max(this.intentRegion, e.durable.granularity);
        const from = Math.floor(offset / region) * region;
        const to = Math.min(Math.ceil((offset + length) / region) * region, this.size);
        const grown = this.scratchDurable;
        grown.length = 0;
        if (e.durable.markRange(from, to - from, grown) > 0) wait = this.queueIntent(e, grown.slice());
      }
    }
    return wait;
  }

  /**
   * An empty summary when two or more bitmaps are enabled (see `summary`) and it fits in the
   * memory limit beside them (else writes mark each bitmap, as without it); otherwise null.
   */
  private newSummary(): DirtyBitmap | null {
    this.summary = null;
    let enabled = 0;
    let granularity = Infinity;
    for (const e of this.entries.values()) {
      if (!e.enabled) continue;
      enabled++;
      granularity = Math.min(granularity, e.bits.granularity);
    }
    if (enabled < 2 || this.memoryUsed() + DirtyBitmap.bytesFor(this.size, granularity) > this.limits.maxMemoryBytes) return null;
    this.summary = new DirtyBitmap(this.size, granularity);
    return this.summary;
  }

  /**
   * Forgets the summary: an enabled bitmap lost bits, or one started recording. Call it before
   * the change is visible to a write (synchronously with it).
   */
  private dropSummary(): void {
    this.summary = undefined;
  }

  private queueIntent(e: Entry, runs: GranuleRun[]): Promise<void> {
    const pending = this.pendingChanges.get(e.name);
    if (pending) pending.runs.push(...runs);
    else this.pendingChanges.set(e.name, { entry: e, runs });
    return this.schedulePending();
  }

  /** Schedules the pending changes to be written after the current turn and the running store op. */
  private schedulePending(): Promise<void> {
    if (this.pendingDurable) return this.pendingDurable;
    // Once the batch is issued: every first-touch write of the batch is in `pendingChanges` then.
    const p = new Promise<void>((resolve) => afterBatch(resolve)).then(() => {
      const changes = this.pendingChanges;
      this.pendingChanges = new Map();
      this.pendingDurable = null;
      const list: BitsChange[] = [...changes.values()]
        .filter(({ entry }) => this.entries.get(entry.name) === entry && entry.persistent)
        .map(({ entry, runs }) => ({ name: entry.name, bits: entry.durable, runs }));
      return this.storeOp(() => this.store!.writeBits(list)).then(
        () => {
          this.failed = false;
        },
        (err: unknown) => {
          // The bits are set in memory but maybe not on disk: keep them pending, so every later
          // write waits for (and retries) this write before it may proceed.
          for (const [name, c] of changes) {
            const again = this.pendingChanges.get(name);
            if (again) again.runs.push(...c.runs);
            else this.pendingChanges.set(name, c);
          }
          this.failed = true;
          log.error(`persisting dirty bits failed: ${(err as Error).message}`);
          this.emit('persist-error', err);
          throw new NbddError(Errno.EIO, `cannot record the write in the dirty bitmap: ${(err as Error).message}`, { cause: err });
        },
      );
    });
    this.pendingDurable = p;
    return p;
  }

  /** Runs a store operation in the chain writes may have to wait for. */
  private storeOp(op: () => Promise<void>): Promise<void> {
    this.storeOpsInFlight++;
    const p = op().finally(() => {
      this.storeOpsInFlight--;
    });
    this.lastStoreOp = p.catch(() => undefined);
    return p;
  }

  /* ------------------------------------------------------------ operations */

  async add(name: string, options: AddOptions = {}): Promise<BitmapInfo> {
    return this.insert(name, options, () => undefined);
  }

  /**
   * Adds the entry in memory at once (it records writes from now on), then persists it. If that
   * fails the entry is taken out again and `undo` runs (synchronously, before anything else).
   */
  private async insert(name: string, options: AddOptions, undo: (e: Entry) => void): Promise<BitmapInfo> {
    const { granularity, persistent } = this.checkNew(name, options);
    const bits = new DirtyBitmap(this.size, granularity);
    const e: Entry = { name, bits, durable: persistent ? new DirtyBitmap(this.size, granularity) : bits, enabled: options.enabled ?? true, persistent, busy: false };
    this.entries.set(name, e);
    if (e.enabled) this.dropSummary();
    if (persistent) {
      try {
        await this.storeOp(() => this.store!.add({ name, granularity, enabled: e.enabled }, e.durable));
      } catch (err) {
        if (this.entries.get(name) === e) this.entries.delete(name);
        undo(e);
        throw err;
      }
    }
    return this.info(e);
  }

  /**
   * Throws (EINVAL, EEXIST, ENOSPC, ENOMEM, ENOTSUP) unless a bitmap `name` with `options` may be
   * added now; returns its granularity and persistence.
   */
  private checkNew(name: string, options: AddOptions): { granularity: number; persistent: boolean } {
    validateName(name);
    if (this.entries.has(name)) throw new NbddError(Errno.EEXIST, `bitmap '${name}' already exists`);
    const granularity = options.granularity ?? DEFAULT_GRANULARITY;
    granularityBits(granularity);
    const persistent = options.persistent ?? this.store !== null;
    this.checkRoomFor(name, granularity, persistent);
    if (persistent && !this.store) {
      throw new NbddError(Errno.ENOTSUP, `bitmap '${name}' cannot be persistent: this disk has no bitmap store (use --bitmap-store)`);
    }
    return { granularity, persistent };
  }

  async remove(name: string): Promise<void> {
    const e = this.entry(name);
    this.assertNotBusy(e);
    this.entries.delete(name);
    if (e.persistent) await this.storeOp(() => this.store!.remove(name));
  }

  async clear(name: string): Promise<void> {
    const e = this.entry(name);
    this.assertNotBusy(e);
    e.bits.clear();
    this.dropSummary();
    if (e.persistent) {
      e.durable.clear();
      await this.storeOp(() => this.store!.writeAll(name, e.durable));
    }
  }

  async enable(name: string): Promise<void> {
    await this.setEnabled(this.entry(name), true);
  }

  async disable(name: string): Promise<void> {
    await this.setEnabled(this.entry(name), false);
  }

  private async setEnabled(e: Entry, enabled: boolean): Promise<void> {
    this.assertNotBusy(e);
    if (e.enabled === enabled) return;
    e.enabled = enabled;
    if (enabled) this.dropSummary();
    if (e.persistent) await this.storeOp(() => this.store!.setEnabled(e.name, enabled));
  }

  /** `target |= sources` (same disk; granularities may differ). */
  async merge(target: string, sources: string[]): Promise<void> {
    const t = this.entry(target);
    this.assertNotBusy(t);
    const srcs = sources.map((s) => this.entry(s));
    for (const s of srcs) {
      t.bits.merge(s.bits);
      if (t.durable !== t.bits) t.durable.merge(s.bits);
    }
    if (t.persistent) await this.storeOp(() => this.store!.writeAll(target, t.durable));
  }

  /**
   * Starts bitmap `name` and disables `disable` (default: every enabled bitmap) in one step: no
   * write lands in both or in neither. The shape of a libvirt checkpoint.
   */
  async checkpoint(name: string, options: AddOptions & { disable?: string[] } = {}): Promise<BitmapInfo> {
    const toDisable = options.disable ? options.disable.map((n) => this.entry(n)) : [...this.entries.values()].filter((e) => e.enabled);
    for (const e of toDisable) this.assertNotBusy(e);
    // Everything that could refuse the new bitmap, before any old one stops recording.
    this.checkNew(name, options);
    const wasEnabled = toDisable.filter((e) => e.enabled);
    // The new bitmap starts and the old ones stop in this synchronous stretch; the store learns
    // of both afterwards, in order. If the new one cannot be stored, the old ones take over again
    // with the writes the new one saw meanwhile.
    for (const e of wasEnabled) e.enabled = false;
    const added = this.insert(name, options, (failed) => {
      this.dropSummary();
      for (const e of wasEnabled) {
        e.enabled = true;
        e.bits.merge(failed.bits);
        if (e.durable !== e.bits) e.durable.merge(failed.bits);
      }
    });
    const persisted = wasEnabled.filter((e) => e.persistent).map((e) => this.storeOp(() => this.store!.setEnabled(e.name, false)));
    const [info] = await Promise.all([added, ...persisted]);
    return info as BitmapInfo;
  }

  /**
   * Freezes bitmap `name` for a backup: a copy of its bits now (transient) is returned, and the
   * bitmap is marked busy until `release`. The live bitmap keeps recording.
   */
  freeze(name: string): DirtyBitmap {
    const e = this.entry(name);
    this.assertNotBusy(e);
    e.busy = true;
    return e.bits.copy();
  }

  release(name: string): void {
    const e = this.entries.get(name);
    if (e) e.busy = false;
  }

  /** Waits for store work, then stores every persistent bitmap in full and closes the store. */
  async close(): Promise<void> {
    if (this.pendingDurable) await this.pendingDurable.catch(() => undefined);
    await this.lastStoreOp;
    if (!this.store) return;
    const persistent: StoredBitmap[] = [...this.entries.values()]
      .filter((e) => e.persistent)
      .map((e) => ({ name: e.name, granularity: e.bits.granularity, enabled: e.enabled, bits: e.bits }));
    await this.store.close(persistent);
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (!e) throw new NbddError(Errno.ENOENT, `no bitmap named '${name}'`);
    return e;
  }

  /** Refuses, before allocating anything, a bitmap past the count or memory limit. */
  private checkRoomFor(name: string, granularity: number, persistent: boolean): void {
    const { maxBitmaps, maxMemoryBytes } = this.limits;
    if (this.entries.size >= maxBitmaps) {
      throw new NbddError(Errno.ENOSPC, `bitmap '${name}': this device has ${this.entries.size} bitmaps, the most it keeps (--max-bitmaps ${maxBitmaps})`);
    }
    const bits = DirtyBitmap.bytesFor(this.size, granularity);
    const bytes = persistent ? 2 * bits : bits; // a persistent bitmap also keeps what its store holds
    const used = this.memoryUsed();
    if (bits > BITMAP_LIMITS.maxDataBytes || used + bytes > maxMemoryBytes) {
      const limit = bits > BITMAP_LIMITS.maxDataBytes ? `more than the ${formatSize(BITMAP_LIMITS.maxDataBytes)} one bitmap may have` : `and the device's bitmaps have ${formatSize(used)} of ${formatSize(maxMemoryBytes)}`;
      throw new NbddError(Errno.ENOMEM, `bitmap '${name}' at granularity ${granularity} needs ${formatSize(bytes)}, ${limit}; use a larger granularity`);
    }
  }

  /** Bytes the bitmaps' bits take (a persistent one's twice: it also keeps what its store holds). */
  private memoryUsed(): number {
    return [...this.entries.values()].reduce((n, e) => n + e.bits.byteLength * (e.durable === e.bits ? 1 : 2), 0);
  }

  private assertNotBusy(e: Entry): void {
    if (e.busy) throw new NbddError(Errno.EBUSY, `bitmap '${e.name}' is in use by a running backup`);
  }
}

/** Bitmap names: 1..1023 UTF-8 bytes of valid Unicode, no NUL or other control characters. */
export function validateName(name: unknown): asserts name is string {
  if (typeof name !== 'string' || name.length === 0) throw new NbddError(Errno.EINVAL, 'a bitmap name must be a non-empty string');
  // A lone surrogate has no UTF-8 form: "s\ud800" and "s\udc00" would be stored as the same bytes.
  if (/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(name)) {
    throw new NbddError(Errno.EINVAL, 'a bitmap name must be valid Unicode (it has a lone surrogate, which UTF-8 cannot store)');
  }
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(name)) throw new NbddError(Errno.EINVAL, 'a bitmap name must not contain control characters');
  if (Buffer.byteLength(name, 'utf8') > MAX_BITMAP_NAME_BYTES) {
    throw new NbddError(Errno.EINVAL, `a bitmap name is at most ${MAX_BITMAP_NAME_BYTES} bytes`);
  }
}
