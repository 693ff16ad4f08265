/**
 * Which BitmapStore an image gets (see docs/sidecar.md, "Where bitmaps are kept"):
 *
 * - `--bitmap-store PATH`: a sidecar file at PATH, whatever the image;
 * - a raw file or block device: a sidecar file at IMAGE.nbdd-bitmaps;
 * - a qcow2 image: for now also IMAGE.nbdd-bitmaps (the in-image qcow2 store is not wired yet);
 * - `memory:` images and read-only opens: none (bitmaps are transient).
 */
import type { Backend } from '../core/backend.js';
import { logger } from '../core/log.js';
import { SidecarFileStore, defaultSidecarPath } from '../bitmaps/store-sidecar-file.js';
import type { BitmapStore } from '../bitmaps/store.js';

const log = logger('bitmaps');

export interface StoreChoice {
  /** Explicit sidecar file path (`--bitmap-store`). */
  path?: string;
}

export async function openBitmapStore(image: string, backend: Backend, choice: StoreChoice = {}): Promise<BitmapStore | null> {
  if (choice.path) return SidecarFileStore.open(choice.path, backend.size);
  if (backend.caps.readOnly || backend.kind === 'memory') return null;
  if (backend.kind === 'qcow2') log.info(`${image}: persistent bitmaps are kept in ${defaultSidecarPath(image)} (not yet inside the qcow2 image)`);
  return SidecarFileStore.open(defaultSidecarPath(image), backend.size);
}
