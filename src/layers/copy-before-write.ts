/**
 * Copy-before-write (fleecing): while a backup runs, the first write (or zeroing, or trim) to a
 * granule the backup still needs first copies the granule's old contents to a scratch store.
 * The backup reads a `FleecingView` — a backend showing the disk exactly as it was when the backup
 * began: copied granules from the scratch store, untouched ones from the live disk.
 *
 * A TRIM sent on the view releases granules the backup is done with: their copies are dropped
 * and later writes there skip the copy. Only whole granules inside the trimmed range are released.
 *
 * When the scratch store is full, the `onLimit` policy decides: `break-backup` (default) stops
 * copying, fails every later read of the view with EIO and emits `backup-error` — the guest never
 * notices; `fail-write` fails the guest's write with ENOSPC and keeps the backup exact. Either way
 * nothing is corrupted silently.
 *
 * Views never see a write before its copy: a write waits for the copies of its granules, and a
 * view read re-checks for copies made while it was reading (see `FleecingView.read`).
 */
import { EventEmitter } from 'node:events';
import { allData, defaultCaps, type Backend, type BackendCaps, type Extent, type WriteOptions, type ZeroOptions } from '../core/backend.js';
import { PassThroughLayer } from '../core/layer.js';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { DEFAULT_GRANULARITY, DirtyBitmap } from '../bitmaps/dirty-bitmap.js';
import { ScratchStore, type ScratchLimits } from './scratch-store.js';

const log = logger('cbw');

export type OnScratchLimit = 'break-backup' | 'fail-write';

export interface BackupOptions {
  /** Copy unit in bytes (power of two, default 64 KiB). */
  granularity?: number;
  scratch?: Partial<ScratchLimits>;
  onLimit?: OnScratchLimit;
}

export interface BackupStats {
  copiedGranules: number;
  releasedGranules: number;
  scratchMemoryBytes: number;
  scratchFileBytes: number;
  broken: string | null;
}

/** What a device offers backup tools: one point-in-time view at a time. */
export interface Fleecing {
  /** Starts a backup (EBUSY if one runs); see CopyBeforeWriteLayer.begin. */
  begin(options?: BackupOptions): FleecingView;
  /** Ends the running backup and drops its scratch data. */
  end(): Promise<void>;
  /** The running backup's view, if any. */
  readonly active: FleecingView | null;
  on(event: 'backup-error', listener: (message: string) => void): this;
  off(event: 'backup-error', listener: (message: string) => void): this;
}

/** Events: `backup-error` (message: string) when the backup breaks. */
export class CopyBeforeWriteLayer extends PassThroughLayer implements Fleecing {
  override readonly kind = 'copy-before-write';
  private view: FleecingView | null = null;
  private readonly events = new EventEmitter();

  constructor(next: Backend) {
    super(next);
    // The guest's own reads pass through: they may show data written after them, as any read
    // overlapping a write may. The backup's view reads into buffers (it has no spliceRead), so
    // what it sends cannot change after it checked for copies.
    this.passSplicedReads();
    // A write from a pipe preserves the old data first, as any write does.
    this.passSplicedWrites((offset, length) => this.view?.preserve(offset, length) ?? null);
  }

  on(event: 'backup-error', listener: (message: string) => void): this {
    this.events.on(event, listener);
    return this;
  }

  off(event: 'backup-error', listener: (message: string) => void): this {
    this.events.off(event, listener);
    return this;
  }

  /** The running backup's view, if any. */
  get active(): FleecingView | null {
    return this.view;
  }

  /**
   * Starts a backup: from now on, writes preserve the old data for the returned view. Throws
   * EBUSY if one is running. Call it between batches (the control path does): the view shows the
   * disk with every write that completed before this call and none issued after.
   */
  begin(options: BackupOptions = {}): FleecingView {
    if (this.view) throw new NbddError(Errno.EBUSY, 'a backup is already running');
    this.view = new FleecingView(this.next, options, (message) => this.events.emit('backup-error', message));
    return this.view;
  }

  /** Ends the running backup and drops its scratch data. */
  async end(): Promise<void> {
    const view = this.view;
    this.view = null;
    await view?.dispose();
  }

  // Without a backup running, requests pass straight through (no extra promise per request).
  override write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const view = this.view;
    if (!view) return this.next.write(offset, data, options);
    return view.preserve(offset, data.length).then(() => this.next.write(offset, data, options));
  }

  override trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    const view = this.view;
    if (!view) return this.next.trim!(offset, length, options);
    return view.preserve(offset, length).then(() => this.next.trim!(offset, length, options));
  }

  override writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    const view = this.view;
    if (!view) return this.next.writeZeroes!(offset, length, options);
    return view.preserve(offset, length).then(() => this.next.writeZeroes!(offset, length, options));
  }

  override async close(): Promise<void> {
    await this.end();
    await this.next.close();
  }
}

/**
 * The point-in-time view a backup reads. Read-only for data (WRITE and WRITE_ZEROES fail with
 * EPERM), but TRIM is accepted: it releases granules (see the file comment). Closing the view's
 * queue does not end the backup; `CopyBeforeWriteLayer.end` does.
 */
export class FleecingView implements Backend {
  readonly kind = 'fleecing';
  readonly caps: BackendCaps;
  readonly granularity: number;
  /** Granules whose old data is still only in the live disk (to copy before they change). */
  private readonly pending: DirtyBitmap;
  /** Granules whose old data is in the scratch store. */
  private readonly copied: DirtyBitmap;
  private readonly scratch: ScratchStore;
  private readonly copying = new Map<number, Promise<void>>();
  private readonly onLimit: OnScratchLimit;
  private broken: NbddError | null = null;
  private released = 0;
  private disposed = false;

  constructor(
    private readonly live: Backend,
    options: BackupOptions,
    private readonly reportError: (message: string) => void,
  ) {
    this.granularity = options.granularity ?? DEFAULT_GRANULARITY;
    this.pending = new DirtyBitmap(live.size, this.granularity);
    this.copied = new DirtyBitmap(live.size, this.granularity);
    this.pending.fill(0, this.pending.granules, true);
    this.scratch = new ScratchStore(this.granularity, options.scratch);
    this.onLimit = options.onLimit ?? 'break-backup';
    this.caps = defaultCaps({
      readOnly: false,
      trim: true,
      blockStatus: true,
      multiConn: true,
      minBlockSize: live.caps.minBlockSize,
      preferredBlockSize: live.caps.preferredBlockSize,
      maxTransfer: live.caps.maxTransfer,
    });
  }

  get size(): number {
    return this.live.size;
  }

  stats(): BackupStats {
    return {
      copiedGranules: this.scratch.count,
      releasedGranules: this.released,
      scratchMemoryBytes: this.scratch.memoryBytes,
      scratchFileBytes: this.scratch.fileBytes,
      broken: this.broken ? this.broken.message : null,
    };
  }

  /** Copies the old data of the granules in the range that still need it (called before a write). */
  async preserve(offset: number, length: number): Promise<void> {
    if (this.broken || this.disposed) return;
    const { first, count } = this.pending.granulesOf(offset, length);
    const end = first + count;
    const waits: Promise<void>[] = [];
    // Copies already running for granules of the range (few: at most a batch's worth).
    for (const [g, running] of this.copying) if (g >= first && g < end) waits.push(running);
    for (let g = this.pending.find(first, end, true); g < end; g = this.pending.find(g + 1, end, true)) {
      waits.push(this.copyGranule(g));
    }
    await Promise.all(waits);
  }

  private copyGranule(g: number): Promise<void> {
    this.pending.fill(g, 1, false);
    const offset = g * this.granularity;
    const p = (async () => {
      try {
        const data = await this.live.read(offset, Math.min(this.granularity, this.size - offset));
        await this.scratch.put(g, data);
        this.copied.fill(g, 1, true);
      } catch (err) {
        if (this.disposed) return;
        if (this.onLimit === 'fail-write' && err instanceof NbddError && err.errno === Errno.ENOSPC) {
          this.pending.fill(g, 1, true); // still needed: a later write must try again
          throw err;
        }
        this.break(err);
      } finally {
        this.copying.delete(g);
      }
    })();
    this.copying.set(g, p);
    return p;
  }

  private break(err: unknown): void {
    if (this.broken) return;
    this.broken = new NbddError(Errno.EIO, `the backup is broken: ${messageOf(err)}`);
    log.error(this.broken.message);
    this.reportError(this.broken.message);
    void this.scratch.close();
  }

  /** The disk as it was at `begin`. Throws EIO once the backup is broken. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.assertUsable();
    const data = await this.live.read(offset, length);
    // Granules copied before or during the live read hold the old data; overlay them. A write
    // that changed what the live read returned was issued after its granule's copy completed,
    // so checking after the read cannot miss one.
    const { first, count } = this.copied.granulesOf(offset, length);
    const end = first + count;
    let out = data;
    for (let g = this.copied.find(first, end, true); g < end; g = this.copied.find(g + 1, end, true)) {
      if (out === data) out = Buffer.from(data); // the live read's buffer may be shared (coalesced reads)
      const old = await this.scratch.get(g);
      const gStart = g * this.granularity;
      const from = Math.max(offset, gStart);
      const to = Math.min(offset + length, gStart + old.length);
      old.copy(out, from - offset, from - gStart, to - gStart);
    }
    this.assertUsable();
    return out;
  }

  async write(): Promise<void> {
    throw new NbddError(Errno.EPERM, 'the backup view is read-only (TRIM releases ranges)');
  }

  async writeZeroes(): Promise<void> {
    throw new NbddError(Errno.EPERM, 'the backup view is read-only (TRIM releases ranges)');
  }

  /** Releases the whole granules inside the range: the backup needs them no more. */
  async trim(offset: number, length: number): Promise<void> {
    const first = Math.ceil(offset / this.granularity);
    const end = Math.min(Math.floor((offset + length) / this.granularity), this.pending.granules);
    const lastPartial = offset + length === this.size ? this.pending.granules : end;
    for (let g = first; g < lastPartial; g++) {
      if (this.pending.get(g)) this.released++;
      else if (this.copied.get(g)) {
        this.released++;
        this.scratch.delete(g);
      }
    }
    if (lastPartial > first) {
      this.pending.fill(first, lastPartial - first, false);
      this.copied.fill(first, lastPartial - first, false);
    }
  }

  /** Like the live disk's, except that granules changed since `begin` report data. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.assertUsable();
    const live = this.live.blockStatus
      ? await this.live.blockStatus(offset, length)
      : allData(length);
    return overlayData(live, offset, this.copied.extents(offset, Math.min(length, this.size - offset)));
  }

  async close(): Promise<void> {
    // The NBD export's queue closes the view; the backup itself ends with CopyBeforeWriteLayer.end.
  }

  async dispose(): Promise<void> {
    this.disposed = true;
    await Promise.allSettled([...this.copying.values()]);
    await this.scratch.close();
  }

  private assertUsable(): void {
    if (this.broken) throw this.broken;
    if (this.disposed) throw new NbddError(Errno.ESHUTDOWN, 'the backup has ended');
  }
}

/**
 * `live` extents (consecutive from `offset`) with the ranges marked dirty in `changed` replaced
 * by allocated data: such granules were modified after the backup began, so whatever the live
 * disk says about them now (a hole, zeroes) is not what the backup must copy.
 */
export function overlayData(live: Extent[], offset: number, changed: { offset: number; length: number; dirty: boolean }[]): Extent[] {
  if (!changed.some((c) => c.dirty)) return live;
  const out: Extent[] = [];
  const push = (e: Extent): void => {
    const last = out[out.length - 1];
    if (last && last.hole === e.hole && last.zero === e.zero && last.depth === e.depth) last.length += e.length;
    else out.push({ ...e });
  };
  let at = offset;
  let ci = 0;
  for (const e of live) {
    const eEnd = at + e.length;
    while (at < eEnd) {
      while (ci < changed.length && changed[ci]!.offset + changed[ci]!.length <= at) ci++;
      const c = changed[ci];
      if (!c) {
        push({ ...e, length: eEnd - at });
        at = eEnd;
        break;
      }
      const to = Math.min(eEnd, c.offset + c.length);
      push(c.dirty ? { length: to - at, hole: false, zero: false, depth: 1 } : { ...e, length: to - at });
      at = to;
    }
  }
  return out;
}
