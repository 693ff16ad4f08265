/**
 * The layer stack every device and export runs on, top to bottom:
 *
 *   stats → dirty tracking → copy-before-write → backend
 *
 * Stats sees what the frontends see (including bitmap persistence and backup copies); dirty
 * tracking marks before copy-before-write so a write that fails its copy is still marked (a
 * superset is always safe); copy-before-write sits right above the backend so its copies read
 * the data exactly as stored.
 */
import type { Backend } from '../core/backend.js';
import type { BitmapSet } from '../bitmaps/bitmap-set.js';
import { CopyBeforeWriteLayer } from '../layers/copy-before-write.js';
import { DirtyTrackingLayer } from '../layers/dirty-tracking.js';
import { StatsLayer } from '../layers/stats.js';

export interface LayerStack {
  /** What the queue is built on. */
  top: StatsLayer;
  stats: StatsLayer;
  tracking: DirtyTrackingLayer;
  cbw: CopyBeforeWriteLayer;
  backend: Backend;
}

/** Builds the stack over `backend`; closing `top` stores the bitmaps and closes the backend. */
export function buildStack(backend: Backend, bitmaps: BitmapSet): LayerStack {
  const cbw = new CopyBeforeWriteLayer(backend);
  const tracking = new DirtyTrackingLayer(cbw, bitmaps);
  const stats = new StatsLayer(tracking);
  return { top: stats, stats, tracking, cbw, backend };
}
