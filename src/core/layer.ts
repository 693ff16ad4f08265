/**
 * The pass-through layer: a backend that forwards everything to `next` unchanged, as nbdkit's
 * filters fall through to the next layer for every callback they do not define. A layer extends
 * it and overrides only what it changes (dirty tracking overrides the three write types, stats
 * wraps every call, copy-before-write the writes and close). Reads and writes through pipes
 * (`spliceRead`, `spliceWrite`) pass only where the layer says so.
 *
 * `caps` and `size` are `next`'s. Optional methods the next backend lacks are only reached when
 * `caps` says they exist (the queue checks `caps.trim`/`caps.writeZeroes` before calling them),
 * except `flush`, `blockStatus` and `cache`, which fall back to the core's defaults: nothing to
 * flush, all data, no prefetch.
 */
import type { Pipe } from '../io/pipes.js';
import { allData, type Backend, type BackendCaps, type Extent, type Layer, type WriteOptions, type ZeroOptions } from './backend.js';

export class PassThroughLayer implements Layer {
  readonly kind: string = 'pass-through';

  constructor(readonly next: Backend) {}

  /**
   * Not passed through by default: reads by reference show data as it is when sent, so each layer
   * says for itself that this is right for it (`passSplicedReads`), and a new layer that overrides
   * `read` cannot be skipped by accident.
   */
  spliceRead?: (offset: number, length: number, into: Pipe) => Promise<void>;

  /** Lets `next`'s spliced reads through this layer unchanged, when it has them. */
  protected passSplicedReads(): void {
    const next = this.next;
    if (next.spliceRead) this.spliceRead = (offset, length, into) => next.spliceRead!(offset, length, into);
  }

  /**
   * Not passed through by default either: the layer never sees the bytes, so each layer says how
   * its write handling applies (`passSplicedWrites`).
   */
  spliceWrite?: (offset: number, length: number, from: Pipe, options?: WriteOptions) => Promise<void>;

  /**
   * Lets `next`'s spliced writes through this layer, when it has them, each after what
   * `before(offset, length)` starts (what the layer does before any write of that range reaches
   * `next`: a write-intent mark, a copy of the old data), if it starts anything.
   */
  protected passSplicedWrites(before: (offset: number, length: number) => Promise<void> | null = () => null): void {
    const next = this.next;
    if (!next.spliceWrite) return;
    this.spliceWrite = (offset, length, from, options) => {
      const first = before(offset, length);
      return first ? first.then(() => next.spliceWrite!(offset, length, from, options)) : next.spliceWrite!(offset, length, from, options);
    };
  }

  get size(): number {
    return this.next.size;
  }

  get caps(): BackendCaps {
    return this.next.caps;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.next.read(offset, length);
  }

  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.next.write(offset, data, options);
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.next.trim!(offset, length, options);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.next.writeZeroes!(offset, length, options);
  }

  flush(): Promise<void> {
    return this.next.flush ? this.next.flush() : Promise.resolve();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus ? this.next.blockStatus(offset, length) : Promise.resolve(allData(length));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.next.cache ? this.next.cache(offset, length) : Promise.resolve();
  }

  close(): Promise<void> {
    return this.next.close();
  }
}
