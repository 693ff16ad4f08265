/**
 * A metadata context as NBD exports it (`base:allocation`, `qemu:allocation-depth`,
 * `qemu:dirty-bitmap:NAME`): a name and a function from a range to status extents.
 *
 * The NBD server derives `base:allocation` and `qemu:allocation-depth` from the backend's
 * `blockStatus`; other providers (dirty bitmaps) register their own contexts on an export.
 */
export interface StatusExtent {
  /** Bytes, > 0. */
  length: number;
  /** Context-specific u32 flags (e.g. NBD_STATE_DIRTY), or a depth for allocation-depth. */
  flags: number;
}

export interface MetaContext {
  /** Full context name, e.g. `qemu:dirty-bitmap:b0`. */
  readonly name: string;
  /**
   * Consecutive extents starting at `offset`, covering at least one byte and at most running past
   * `offset + length` (the server trims). `offset + length <= export size` is guaranteed.
   */
  extents(offset: number, length: number): Promise<StatusExtent[]>;
}
