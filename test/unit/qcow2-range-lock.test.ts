/** The cluster range lock: arrival order for conflicts, sharing for readers, independence otherwise. */
import { describe, expect, it } from 'vitest';
import { RangeLock } from '../../src/backends/qcow2/range-lock.js';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
/** `take` as a promise either way. */
const acquire = (lock: RangeLock, first: number, last: number, exclusive: boolean): Promise<() => void> => Promise.resolve(lock.take(first, last, exclusive));

describe('RangeLock', () => {
  it('grants overlapping exclusive holders in arrival order', async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const a = acquire(lock, 0, 3, true).then((rel) => (order.push('a'), rel));
    const b = acquire(lock, 3, 5, true).then((rel) => (order.push('b'), rel));
    const c = acquire(lock, 2, 2, false).then((rel) => (order.push('c'), rel));
    const releaseA = await a;
    await tick();
    expect(order).toEqual(['a']);
    releaseA();
    // b and c overlap a but not each other: both proceed once a is released.
    const [releaseB, releaseC] = await Promise.all([b, c]);
    expect(order).toEqual(['a', 'b', 'c']);
    releaseB();
    releaseC();
  });

  it('lets readers share and keeps a later writer behind them', async () => {
    const lock = new RangeLock();
    const r1 = await acquire(lock, 0, 10, false);
    const r2 = await acquire(lock, 5, 6, false);
    let written = false;
    const w = acquire(lock, 6, 6, true).then((rel) => ((written = true), rel));
    await tick();
    expect(written).toBe(false);
    r1();
    await tick();
    expect(written).toBe(false);
    r2();
    (await w)();
    expect(written).toBe(true);
  });

  it('take: the release itself when nothing is in the way, a promise of it behind a holder', async () => {
    const lock = new RangeLock();
    const first = lock.take(0, 3, true);
    expect(typeof first).toBe('function');
    const shared = lock.take(5, 6, false);
    expect(typeof shared).toBe('function');
    const behind = lock.take(3, 5, false);
    expect(behind).toBeInstanceOf(Promise);
    let granted = false;
    void (behind as Promise<() => void>).then(() => (granted = true));
    await tick();
    expect(granted).toBe(false);
    (first as () => void)();
    await tick();
    expect(granted).toBe(true); // a shared holder (5..6) does not stop a shared request
    (shared as () => void)();
    (await behind)();
  });

  it('does not hold back disjoint ranges', async () => {
    const lock = new RangeLock();
    const held = await acquire(lock, 0, 0, true);
    const other = await acquire(lock, 1, 1, true);
    other();
    held();
  });
});
