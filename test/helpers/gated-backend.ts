/**
 * A backend wrapper whose every operation waits at a gate until the test releases it, so a test
 * decides the order in which backend calls *complete* (not merely when they start). Ordering
 * invariants (a FLUSH after the writes it covers, FUA's flush, backpressure) are only tested when
 * completions can be held back: with equal delays, a broken barrier still looks right.
 *
 *   const gate = new GatedBackend(new TestBackend(SIZE));
 *   const w = queue.write(0, buf);
 *   await gate.waitFor('write');      // the queue issued the write
 *   gate.release('write');            // now it completes
 */
import type { Backend, BackendCaps, Extent, WriteOptions, ZeroOptions } from '../../src/core/backend.js';
import type { Op } from './test-backend.js';

export interface HeldCall {
  op: Op;
  offset?: number;
  length?: number;
  options?: WriteOptions | ZeroOptions;
  /** Lets the call proceed to the wrapped backend (it then settles as that backend does). */
  release(): void;
  /** Makes the call fail with `err` without reaching the wrapped backend. */
  fail(err: unknown): void;
  /** Resolves once the call has settled (after release/fail and the wrapped backend's answer). */
  settled: Promise<void>;
}

export class GatedBackend implements Backend {
  readonly kind = 'gated';
  /** Calls issued and not yet released, in issue order. */
  readonly held: HeldCall[] = [];
  /** Every call ever issued, in issue order. */
  readonly issued: HeldCall[] = [];
  private waiters: { pred: (c: HeldCall) => boolean; resolve: (c: HeldCall) => void }[] = [];
  /** When false, calls pass straight through (the gate is open). */
  gated = true;

  constructor(readonly inner: Backend) {}

  get size(): number {
    return this.inner.size;
  }

  get caps(): BackendCaps {
    return this.inner.caps;
  }

  private hold<T>(op: Op, run: () => Promise<T>, offset?: number, length?: number, options?: WriteOptions | ZeroOptions): Promise<T> {
    let release!: () => void;
    let fail!: (err: unknown) => void;
    const go = new Promise<void>((res, rej) => {
      release = res;
      fail = rej;
    });
    let settledResolve!: () => void;
    const settled = new Promise<void>((r) => (settledResolve = r));
    const call: HeldCall = { op, offset, length, options, release: () => this.unhold(call, release), fail: (e) => this.unhold(call, () => fail(e)), settled };
    this.issued.push(call);
    this.held.push(call);
    for (const w of [...this.waiters]) {
      if (w.pred(call)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(call);
      }
    }
    if (!this.gated) call.release();
    const result = go.then(run);
    void result.then(settledResolve, settledResolve);
    return result;
  }

  private unhold(call: HeldCall, fn: () => void): void {
    const i = this.held.indexOf(call);
    if (i >= 0) this.held.splice(i, 1);
    fn();
  }

  /** The first held call of `op` (optionally matching `pred`), waiting until one is issued. */
  waitFor(op: Op, pred: (c: HeldCall) => boolean = () => true): Promise<HeldCall> {
    const match = (c: HeldCall): boolean => c.op === op && pred(c);
    const found = this.held.find(match);
    if (found) return Promise.resolve(found);
    return new Promise((resolve) => this.waiters.push({ pred: match, resolve }));
  }

  /** Releases every held call of `op` (all held calls when omitted); returns how many. */
  release(op?: Op): number {
    const calls = this.held.filter((c) => op === undefined || c.op === op);
    for (const c of calls) c.release();
    return calls.length;
  }

  /** Opens the gate for good and releases what is held. */
  open(): void {
    this.gated = false;
    this.release();
  }

  ops(): Op[] {
    return this.issued.map((c) => c.op);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.hold('read', () => this.inner.read(offset, length), offset, length);
  }

  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.hold('write', () => this.inner.write(offset, data, options), offset, data.length, options);
  }

  flush(): Promise<void> {
    return this.hold('flush', () => this.inner.flush!());
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.hold('trim', () => this.inner.trim!(offset, length, options), offset, length, options);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.hold('writeZeroes', () => this.inner.writeZeroes!(offset, length, options), offset, length, options);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.hold('blockStatus', () => this.inner.blockStatus!(offset, length), offset, length);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Lets every pending macrotask (setImmediate dispatch) and microtask run. */
export function turns(n = 3): Promise<void> {
  let p = Promise.resolve();
  for (let i = 0; i < n; i++) p = p.then(() => new Promise((r) => setImmediate(r)));
  return p;
}
