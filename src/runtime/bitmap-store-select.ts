/**
 * Which BitmapStore an image gets (see docs/sidecar.md, "Where bitmaps are kept"):
 *
 * - `--bitmap-store PATH`: a sidecar file at PATH, whatever the image;
 * - a raw file or block device: a sidecar file at IMAGE.nbdd-bitmaps;
 * - a writable qcow2 image: inside the image (the qcow2 bitmaps extension, QEMU-compatible);
 * - remote NBD backends (no local path to put a file beside), `memory:` images and read-only
 *   opens: none (bitmaps are transient). A read-only qcow2 image still publishes its stored
 *   bitmaps (`readOnlyBitmaps`): loaded as they are, as transient bitmaps, without writing a byte.
 */
import type { Backend } from '../core/backend.js';
import { SidecarFileStore, defaultSidecarPath } from '../bitmaps/store-sidecar-file.js';
import { Qcow2BitmapStore, readStoredBitmaps, type Qcow2BitmapHost, type Qcow2BitmapSource } from '../bitmaps/store-qcow2.js';
import type { BitmapStore, StoredBitmap } from '../bitmaps/store.js';

export interface StoreChoice {
  /** Explicit sidecar file path (`--bitmap-store`). */
  path?: string;
}

export async function openBitmapStore(image: string, backend: Backend, choice: StoreChoice = {}): Promise<BitmapStore | null> {
  if (choice.path) return SidecarFileStore.open(choice.path, backend.size);
  if (backend.caps.readOnly) return null;
  const host = hasBitmapHost(backend) ? backend.bitmapHost() : null;
  if (host) return new Qcow2BitmapStore(host);
  return backend.kind === 'raw' ? SidecarFileStore.open(defaultSidecarPath(image), backend.size) : null;
}

/** The stored bitmaps of a read-only qcow2 image (none otherwise), for publishing as they are. */
export async function readOnlyBitmaps(backend: Backend): Promise<StoredBitmap[]> {
  if (!backend.caps.readOnly || !hasBitmapSource(backend)) return [];
  const source = backend.bitmapSource();
  return source ? readStoredBitmaps(source) : [];
}

function hasBitmapSource(b: Backend): b is Backend & { bitmapSource(): Qcow2BitmapSource | null } {
  return typeof (b as { bitmapSource?: unknown }).bitmapSource === 'function';
}

function hasBitmapHost(b: Backend): b is Backend & { bitmapHost(): Qcow2BitmapHost | null } {
  return typeof (b as { bitmapHost?: unknown }).bitmapHost === 'function';
}
