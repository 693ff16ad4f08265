/**
 * The metadata context names nbdd speaks (server, client, sidecar and tools alike) and how a
 * backend extent maps to each one's flags. Protocol vocabulary: it lives with the wire, so a
 * backend or a CLI tool never imports it from the server.
 */
import type { Extent } from '../../core/backend.js';
import { NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO } from './constants.js';

export const BASE_ALLOCATION = 'base:allocation';
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
/** `qemu:dirty-bitmap:NAME`, one per bitmap. */
export const DIRTY_BITMAP_CONTEXT_PREFIX = 'qemu:dirty-bitmap:';

export function isDirtyBitmapContext(name: string): boolean {
  return name.startsWith(DIRTY_BITMAP_CONTEXT_PREFIX);
}

/** base:allocation flags of a backend extent. */
export function allocationFlags(e: Extent): number {
  return (e.hole ? NBD_STATE_HOLE : 0) | (e.zero ? NBD_STATE_ZERO : 0);
}

/** qemu:allocation-depth value of a backend extent (0 hole, 1 data, unless the backend says). */
export function depthOf(e: Extent): number {
  return e.depth ?? (e.hole ? 0 : 1);
}

/** qemu:dirty-bitmap flags of a bitmap extent. */
export function dirtyFlags(dirty: boolean): number {
  return dirty ? NBD_STATE_DIRTY : 0;
}
