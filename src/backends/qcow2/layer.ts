/**
 * What a qcow2 image needs from the image below it in a backing chain (qcow2 or raw): sizes,
 * reads into a caller's buffer and block status. Depths in extents count from this layer (1).
 */
import type { Extent } from '../../core/backend.js';
import type { RemoteLink } from '../remote.js';

export interface ImageLayer {
  readonly format: 'qcow2' | 'raw';
  readonly path: string;
  /** Virtual size in bytes. */
  readonly size: number;
  /** The layer below, if any. */
  readonly backing: ImageLayer | null;
  /** Set on a layer that is an NBD export (NbdLayer): its connection to the server. */
  readonly remote?: RemoteLink;
  /**
   * Fills all of `buf` with the bytes at `offset`; `offset + buf.length <= size`. The buffer
   * stays the caller's; it is written only until the promise settles.
   */
  readInto(buf: Buffer, offset: number): Promise<void>;
  /** Consecutive extents from `offset`, covering at least one byte and at most `length` bytes. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
}
