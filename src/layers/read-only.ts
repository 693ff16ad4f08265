/**
 * Read-only: refuses every write-type request with EPERM and reports `caps.readOnly`, so the
 * export above it advertises NBD_FLAG_READ_ONLY. Reads and block status pass through.
 */
import type { Backend, BackendCaps, Extent, Layer } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';

export class ReadOnlyLayer implements Layer {
  readonly kind = 'read-only';
  readonly caps: BackendCaps;

  constructor(readonly next: Backend) {
    this.caps = { ...next.caps, readOnly: true, trim: false, writeZeroes: false, fastZero: false };
  }

  get size(): number {
    return this.next.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.next.read(offset, length);
  }

  async write(): Promise<void> {
    throw new NbddError(Errno.EPERM, 'this export is read-only');
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus ? this.next.blockStatus(offset, length) : Promise.resolve([{ length, hole: false, zero: false, depth: 1 }]);
  }

  /** Does not close `next`: a read-only view shares the backend it looks at. */
  async close(): Promise<void> {}
}
