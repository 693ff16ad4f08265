import { describe, expect, it } from 'vitest';
import { L2Cache, type L2Table } from '../../src/backends/qcow2/l2-tables.js';

const table = (offset: number, pins = 0): L2Table => ({ offset, data: Buffer.alloc(0), pins, used: false });
const cached = (c: L2Cache, keys: number[]): number[] => keys.filter((k) => c.get(k) !== undefined);

describe('L2Cache (second chance)', () => {
  it('keeps at most its capacity, dropping the oldest table nobody looked up', () => {
    const c = new L2Cache(3);
    for (const k of [1, 2, 3]) c.insert(k, table(k));
    c.insert(4, table(4));
    // 1 was never looked up: it goes first.
    expect([1, 2, 3, 4].map((k) => c.get(k) !== undefined)).toEqual([false, true, true, true]);
  });

  it('gives a table looked up since the last eviction a second chance', () => {
    const c = new L2Cache(3);
    for (const k of [1, 2, 3]) c.insert(k, table(k));
    expect(c.get(1)?.offset).toBe(1);
    c.insert(4, table(4)); // 1 is marked: it moves to the back unmarked, and 2 goes
    expect(c.get(3)?.offset).toBe(3);
    c.insert(5, table(5)); // 3 is marked: it moves to the back unmarked, and 4 goes
    expect(cached(c, [1, 2, 3, 4, 5])).toEqual([1, 3, 5]);
  });

  it('looks up without changing the Map (the hot path only marks)', () => {
    const c = new L2Cache(2);
    const a = table(1);
    c.insert(1, a);
    c.insert(2, table(2));
    for (let i = 0; i < 5; i++) c.get(1);
    expect(a.used).toBe(true);
    c.insert(3, table(3)); // 1 marked: spared and unmarked; 2 goes
    expect(a.used).toBe(false);
    expect(cached(c, [1, 2, 3])).toEqual([1, 3]);
  });

  it('never drops a pinned table, even past its capacity', () => {
    const c = new L2Cache(2);
    c.insert(1, table(1, 1));
    c.insert(2, table(2, 1));
    c.insert(3, table(3, 1));
    expect(cached(c, [1, 2, 3])).toEqual([1, 2, 3]);
    c.get(3)!.pins = 0;
    c.get(1)!.pins = 0;
    c.insert(4, table(4));
    // Two over: 1 and 3 are marked and move to the back, 2 is pinned, 4 goes; then 1, met again
    // unmarked, goes too.
    expect(cached(c, [1, 2, 3, 4])).toEqual([2, 3]);
  });
});
