/**
 * One place that opens a device's request path: image backend → layers → BlockQueue, with its
 * bitmap store. Every frontend (NBD server, kernel NBD, ublk) and the sidecar take a DeviceStack
 * from here, so layers apply to all of them. The layers, top to bottom:
 *
 *   stats → dirty tracking → copy-before-write → backend
 *
 * Stats sees what the frontends see (including bitmap persistence and backup copies); dirty
 * tracking marks before copy-before-write so a write that fails its copy is still marked (a
 * superset is always safe); copy-before-write sits right above the backend so its copies read the
 * data exactly as stored.
 *
 * The stack is reached by role, never by layer: frontends drive `queue` (nothing reaches around
 * it to the backend), the sidecar uses `stats`, `fleecing`, `bitmaps` and `metaContexts`.
 */
import type { Backend } from '../core/backend.js';
import type { MetaContext } from '../core/meta-context.js';
import { BlockQueue, type QueueOptions } from '../core/queue.js';
import { openImage, type OpenOptions } from '../backends/open.js';
import { BitmapSet, type BitmapSetLimits } from '../bitmaps/bitmap-set.js';
import { CopyBeforeWriteLayer, type Fleecing } from '../layers/copy-before-write.js';
import { DirtyTrackingLayer } from '../layers/dirty-tracking.js';
import { StatsLayer, type StatsSource } from '../layers/stats.js';
import { openBitmapStore, readOnlyBitmaps } from './bitmap-store-select.js';

export interface StackOptions extends OpenOptions {
  queue?: QueueOptions;
  /** Keep persistent dirty bitmaps in this sidecar file (default: see bitmap-store-select.ts). */
  bitmapStore?: string;
  bitmapLimits?: Partial<BitmapSetLimits>;
}

/** What a device runs on. */
export interface DeviceStack {
  /** What the image is (kind, size, caps) — for descriptions; requests go through `queue`. */
  readonly image: Pick<Backend, 'kind' | 'size' | 'caps'>;
  /** The one entry point for requests. */
  readonly queue: BlockQueue;
  readonly bitmaps: BitmapSet;
  readonly stats: StatsSource;
  /** Point-in-time views for backups (copy-before-write). */
  readonly fleecing: Fleecing;
  /** The contexts the layers publish now (one `qemu:dirty-bitmap:NAME` per bitmap). */
  metaContexts(): MetaContext[];
  /** Flushes and closes: the queue drains, then the layers store the bitmaps and close the image. */
  close(): Promise<void>;
}

/** Builds the layers and the queue over an open `backend` (which the stack then owns). */
export function buildStack(backend: Backend, bitmaps: BitmapSet, queueOptions?: QueueOptions): DeviceStack {
  const fleecing = new CopyBeforeWriteLayer(backend);
  const tracking = new DirtyTrackingLayer(fleecing, bitmaps);
  const stats = new StatsLayer(tracking);
  const queue = new BlockQueue(stats, queueOptions);
  return {
    image: backend,
    queue,
    bitmaps,
    stats,
    fleecing,
    metaContexts: () => tracking.metaContexts(),
    close: () => queue.close(),
  };
}

/** Opens `image` (see `openImage`) with its bitmap store, and builds the stack over it. */
export async function openStack(image: string, options: StackOptions = {}): Promise<DeviceStack> {
  const backend = await openImage(image, options);
  let bitmaps: BitmapSet;
  try {
    const store = await openBitmapStore(image, backend, { path: options.bitmapStore });
    bitmaps = await BitmapSet.open(backend.size, store, { ...options.bitmapLimits, transient: store ? [] : await readOnlyBitmaps(backend) });
  } catch (err) {
    await backend.close();
    throw err;
  }
  return buildStack(backend, bitmaps, options.queue);
}
