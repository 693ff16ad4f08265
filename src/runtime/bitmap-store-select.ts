/**
 * Which BitmapStore an image gets (see docs/sidecar.md, "Where bitmaps are kept"):
 *
 * - `--bitmap-store PATH`: a sidecar file at PATH, whatever the image;
 * - a raw file or block device: a sidecar file at IMAGE.nbdd-bitmaps;
 * - a writable qcow2 image: inside the image (the qcow2 bitmaps extension, QEMU-compatible);
 * - remote NBD backends (no local path to put a file beside), `memory:` images and read-only
 *   opens: none (bitmaps are transient).
 */
import type { Backend } from '../core/backend.js';
import { SidecarFileStore, defaultSidecarPath } from '../bitmaps/store-sidecar-file.js';
import { Qcow2BitmapStore, type Qcow2BitmapHost } from '../bitmaps/store-qcow2.js';
import type { BitmapStore } from '../bitmaps/store.js';

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

function hasBitmapHost(b: Backend): b is Backend & { bitmapHost(): Qcow2BitmapHost | null } {
  return typeof (b as { bitmapHost?: unknown }).bitmapHost === 'function';
}
