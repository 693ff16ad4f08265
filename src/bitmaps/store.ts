/**
 * Where persistent dirty bitmaps live between runs: inside a qcow2 image (the qcow2 bitmaps
 * extension) or, for raw images and remote backends, in a sidecar file beside the image.
 *
 * The write-intent rule (see docs/sidecar.md, "Crash safety"): the bits on disk are always a
 * superset of the granules changed since the bitmap was last cleared. The caller (`BitmapSet`)
 * keeps it by calling `writeBits` with the newly dirtied granules and waiting for it before the
 * writes that dirtied them are issued. Every method that resolves has made its change durable.
 *
 * A store serializes its own operations: a call made while another runs starts after it, in call
 * order. Bitmaps belong to the caller; a store keeps a reference to each bitmap it returned from
 * `load` or was given by `add` (until `remove`), reads it when it rewrites its metadata, and
 * never modifies it.
 */
import type { DirtyBitmap, GranuleRun } from './dirty-bitmap.js';

/** What is recorded about a bitmap besides its bits. */
export interface BitmapMeta {
  name: string;
  granularity: number;
  /** Recording writes (qcow2's `auto` flag). */
  enabled: boolean;
}

export interface StoredBitmap extends BitmapMeta {
  bits: DirtyBitmap;
}

/** Granules of one bitmap that turned dirty and must reach the disk. */
export interface BitsChange {
  name: string;
  bits: DirtyBitmap;
  runs: GranuleRun[];
}

export interface BitmapStore {
  /** "sidecar-file" or "qcow2". */
  readonly kind: string;
  /** Where the bitmaps are kept (a path), for status output. */
  readonly location: string;
  /** Every stored bitmap, with its bits. Called once, before anything else. */
  load(): Promise<StoredBitmap[]>;
  /** Records a new bitmap (name unused) with its current bits. */
  add(meta: BitmapMeta, bits: DirtyBitmap): Promise<void>;
  remove(name: string): Promise<void>;
  /** Changes a bitmap's recorded flags (enable/disable). */
  setEnabled(name: string, enabled: boolean): Promise<void>;
  /**
   * Write-intent: writes the bytes holding `runs` of each change, then one sync for all. Changes
   * of bitmaps the store does not hold (removed meanwhile, or whose `add` failed) are skipped.
   */
  writeBits(changes: BitsChange[]): Promise<void>;
  /** Replaces a bitmap's stored bits with `bits` (after clear or merge). */
  writeAll(name: string, bits: DirtyBitmap): Promise<void>;
  /** Clean close: stores every bitmap in full, marks the store consistent, releases it. */
  close(bitmaps: StoredBitmap[]): Promise<void>;
}

/** Runs an async operation after every earlier one settled (the store's serialization). */
export class OpChain {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(op: () => Promise<T>): Promise<T> {
    const p = this.tail.then(op, op);
    this.tail = p.catch(() => undefined);
    return p;
  }
}
