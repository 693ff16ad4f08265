/**
 * The backend contract: what every image format, file and remote server offers the core.
 *
 * Modelled on nbdkit's plugin API: a few required methods, optional ones, and capabilities as
 * data. The core (`BlockQueue`) emulates what a backend lacks: FUA becomes write + flush, a missing
 * `writeZeroes` becomes a write of zeroes, a missing `blockStatus` reports everything allocated.
 *
 * Contract for callers (the queue and the layers, never a frontend directly):
 * - every range is validated before it reaches a backend: `offset + length <= size`, `length > 0`
 *   for data commands, lengths within `caps.maxTransfer`; backends may assert this;
 * - writes are never sent to a backend whose `caps.readOnly` is true;
 * - requests come in batches (src/core/batch.ts): the queue issues a batch inside `runBatch`, and
 *   every layer calls `next` for a request synchronously within its own call (a layer that must
 *   wait first — dirty tracking waiting for its bits — chains `next` on that promise, never on a
 *   timer). So a backend (or a layer) sees a batch's calls in one synchronous stretch, in arrival
 *   order, and may register per-batch work with `afterBatch`: it runs after the batch's last call
 *   and before any of its requests completes. Write-intent bitmaps rely on this: the bits of a
 *   batch's first-touch writes are persisted once, and those writes reach the next layer only
 *   after that (test/unit/write-intent.test.ts);
 * - `flush()` is called only after every write it must cover has completed;
 * - buffers passed to `write` belong to the backend until the promise settles; buffers returned by
 *   `read` belong to the caller.
 * Errors are thrown as `NbddError` with an errno (see `src/core/errors.ts`).
 */

import { assert } from './errors.js';
import type { Pipe } from '../io/pipes.js';

/** One extent of block status. Extents returned by `blockStatus` are consecutive. */
export interface Extent {
  /** Bytes, > 0. */
  length: number;
  /** Not allocated in any layer (a hole; reads come from nowhere). */
  hole: boolean;
  /** Reads as zeroes. */
  zero: boolean;
  /**
   * Which layer holds the data: 0 unallocated, 1 this image, 2 its backing file, ... As
   * `qemu:allocation-depth`. Backends without layers report 1 for data and 0 for holes.
   */
  depth?: number;
}

export interface BackendCaps {
  readOnly: boolean;
  /** A volatile cache exists and `flush()` makes writes durable. */
  flush: boolean;
  /** `write(..., {fua: true})` is durable on completion without a separate flush. */
  fua: boolean;
  trim: boolean;
  writeZeroes: boolean;
  /**
   * `blockStatus` reports real allocation (holes, zeroes, depth). When false the core answers
   * every block-status query with all data, and frontends do not plan sparse reads.
   */
  blockStatus: boolean;
  /** `writeZeroes` with `fastZero` fails fast with ENOTSUP instead of writing zeroes slowly. */
  fastZero: boolean;
  /** Several connections may be served at once with consistent results (flush covers all). */
  multiConn: boolean;
  /** Smallest alignment the backend needs (1 for byte-granular). */
  minBlockSize: number;
  /** Preferred request size. */
  preferredBlockSize: number;
  /** Largest single request the backend accepts, in bytes. */
  maxTransfer: number;
}

export interface WriteOptions {
  /** Durable before the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** Keep the range allocated (NBD_CMD_FLAG_NO_HOLE, REQ_NOUNMAP). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than fall back to writing zero bytes. */
  fastZero?: boolean;
}

export interface Backend {
  /** Human-readable kind, e.g. "raw", "qcow2", "nbd", "memory". */
  readonly kind: string;
  /** Virtual size in bytes. */
  readonly size: number;
  readonly caps: BackendCaps;

  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void>;
  flush?(): Promise<void>;
  trim?(offset: number, length: number, options?: WriteOptions): Promise<void>;
  writeZeroes?(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  /** Extents covering at least `[offset, offset+1)` and at most past `offset+length`. */
  blockStatus?(offset: number, length: number): Promise<Extent[]>;
  /**
   * Reads `length` bytes at `offset` into the pipe `into` by reference to page-cache pages, with no
   * copy (src/io/pipes.ts), where the backend can: all of them, or a rejection (the caller reads
   * the usual way). ENOTSUP says the pipe was not touched (this range cannot go by reference);
   * after any other error its content is unknown. The pipe shows the bytes as they are when its
   * reader takes them, not as they were at this call: a layer offers this only when that is right
   * for every read it passes (a layer that changes or snapshots data must not).
   */
  spliceRead?(offset: number, length: number, into: Pipe): Promise<void>;
  /**
   * Writes `length` bytes taken from the pipe `from` (which holds exactly them: a WRITE's payload
   * spliced from its socket, src/nbd/server/spliced-payload.ts) at `offset`, as `write` would,
   * where the backend can. ENOTSUP says the pipe was not touched (this range cannot be written
   * this way; the queue then reads the pipe into a buffer and calls `write`); after any other
   * error its content is unknown. A layer offers this only when what it does for a write is right
   * for it too (it never sees the bytes).
   */
  spliceWrite?(offset: number, length: number, from: Pipe, options?: WriteOptions): Promise<void>;
  /** Hint to prefetch (NBD_CMD_CACHE); optional. */
  cache?(offset: number, length: number): Promise<void>;
  /** Flushes if writable, releases files and locks. Idempotent. */
  close(): Promise<void>;
}

/** Block status of a backend that cannot tell: `length` bytes of data in this layer. */
export function allData(length: number): Extent[] {
  return [{ length, hole: false, zero: false, depth: 1 }];
}

/** Defaults the core assumes for a backend that does not say otherwise. */
export const DEFAULT_MAX_TRANSFER = 32 * 1024 * 1024;

export function defaultCaps(overrides: Partial<BackendCaps> = {}): BackendCaps {
  return {
    readOnly: false,
    flush: false,
    fua: false,
    trim: false,
    writeZeroes: false,
    fastZero: false,
    blockStatus: false,
    multiConn: true,
    minBlockSize: 1,
    preferredBlockSize: 4096,
    maxTransfer: DEFAULT_MAX_TRANSFER,
    ...overrides,
  };
}

/** A layer wraps the next backend and is itself a backend (see `src/layers/`). */
export type Layer = Backend & { readonly next: Backend };

/**
 * Backends' check of the range contract above (validated at the edge, so a failure here is an
 * internal error): `offset` and `length` are safe integers, `length > 0`, `offset + length <= size`.
 * The message is made only on failure: this runs on every request, and V8 makes the strings of
 * numbers it converts in its old generation (they go to its number-string cache), so an eager
 * message left two dead strings there per request, a full GC's worth every few seconds.
 */
export function assertRange(size: number, offset: number, length: number): void {
  if (Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length > 0 && offset + length <= size) return;
  assert(false, `range ${offset}+${length} outside 0..${size}`);
}
