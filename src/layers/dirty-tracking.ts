/**
 * Dirty tracking: marks every WRITE, WRITE_ZEROES and TRIM in the enabled bitmaps of a
 * `BitmapSet`, and for persistent bitmaps makes the marks durable before the write is issued to
 * the next backend (write-intent; see `BitmapSet.mark` and docs/sidecar.md). The marks of one
 * batch are persisted together, so a batch of first-touch writes costs one bitmap write and one
 * fdatasync; writes into granules already dirty pass straight through.
 *
 * It also publishes each bitmap as the NBD metadata context `qemu:dirty-bitmap:NAME`.
 */
import type { Backend, WriteOptions, ZeroOptions } from '../core/backend.js';
import { PassThroughLayer } from '../core/layer.js';
import type { MetaContext, StatusExtent } from '../core/meta-context.js';
import { DIRTY_BITMAP_CONTEXT_PREFIX, dirtyFlags } from '../nbd/wire/contexts.js';
import type { BitmapSet } from '../bitmaps/bitmap-set.js';
import type { DirtyBitmap } from '../bitmaps/dirty-bitmap.js';

/** Most extents one block-status answer carries (the client asks again from where it stopped). */
export const MAX_STATUS_EXTENTS = 65536;

export class DirtyTrackingLayer extends PassThroughLayer {
  override readonly kind = 'dirty-tracking';

  constructor(
    next: Backend,
    readonly bitmaps: BitmapSet,
  ) {
    super(next);
    this.passSplicedReads(); // reads are not tracked
    this.passSplicedWrites((offset, length) => this.bitmaps.mark(offset, length));
  }

  // Writes into granules already marked (the common case) pass straight through, without an
  // extra promise per request.
  override write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const durable = this.bitmaps.mark(offset, data.length);
    return durable ? durable.then(() => this.next.write(offset, data, options)) : this.next.write(offset, data, options);
  }

  override trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    const durable = this.bitmaps.mark(offset, length);
    return durable ? durable.then(() => this.next.trim!(offset, length, options)) : this.next.trim!(offset, length, options);
  }

  override writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    const durable = this.bitmaps.mark(offset, length);
    return durable
      ? durable.then(() => this.next.writeZeroes!(offset, length, options))
      : this.next.writeZeroes!(offset, length, options);
  }

  /** Stores the bitmaps (clean close), then closes the next backend. */
  override async close(): Promise<void> {
    try {
      await this.bitmaps.close();
    } finally {
      await this.next.close();
    }
  }

  /** One `qemu:dirty-bitmap:NAME` context per bitmap now in the set. */
  metaContexts(): MetaContext[] {
    return this.bitmaps.list().map((b) => bitmapContext(b.name, () => this.bitmaps.bits(b.name)));
  }
}

/**
 * The context `qemu:dirty-bitmap:NAME` over the bits `bits()` returns (looked up per query, so a
 * removed bitmap answers with the lookup's error instead of stale data).
 */
export function bitmapContext(name: string, bits: () => DirtyBitmap): MetaContext {
  return {
    name: DIRTY_BITMAP_CONTEXT_PREFIX + name,
    extents: async (offset: number, length: number): Promise<StatusExtent[]> =>
      bits()
        .extents(offset, length, MAX_STATUS_EXTENTS)
        .map((e) => ({ length: e.length, flags: dirtyFlags(e.dirty) })),
  };
}
