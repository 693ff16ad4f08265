import { describe, expect, it } from 'vitest';
import type { Allocator } from '../../src/backends/qcow2/allocator.js';
import { L2Cache, type L2Table, L2Tables } from '../../src/backends/qcow2/l2-tables.js';
import type { ImageState } from '../../src/backends/qcow2/state.js';

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

/**
 * L2Tables over a stand-in image: table `i` lives at host offset (i + 1) × cs and its cluster
 * reads as bytes i + 1, one event-loop turn after the read is issued (as a file read would).
 */
function tablesOver(capacity: number, cs = 64 * 1024, failing = new Set<number>()): { tables: L2Tables; reads: () => number } {
  let reads = 0;
  const port = {
    readAt: (buf: Buffer, offset: number): Promise<Buffer> =>
      new Promise((resolve, reject) =>
        setImmediate(() => {
          reads++;
          if (failing.has(offset / cs - 1)) reject(new Error(`EIO reading table ${offset / cs - 1}`));
          else resolve(buf.fill(offset / cs));
        }),
      ),
  };
  const st = { cs, port, l1Offset: (i: number) => (i + 1) * cs } as unknown as ImageState;
  return { tables: new L2Tables(st, {} as Allocator, capacity * cs), reads: () => reads };
}

const holds = (t: L2Table, i: number): boolean => t.data.every((b) => b === ((i + 1) & 0xff));

async function churn(tables: L2Tables, from: number, count: number): Promise<void> {
  for (let i = from; i < from + count; i++) {
    const t = (await tables.acquire(i))!;
    expect(holds(t, i)).toBe(true);
    tables.release(t);
  }
}

describe('L2Tables: pinned for whoever holds one, evicted buffers reused', () => {
  it('keeps a held table, its bytes and its place while loads evict all around it', async () => {
    const { tables, reads } = tablesOver(4);
    const held = (await tables.acquire(0))!;
    await churn(tables, 1, 40);
    expect(holds(held, 0)).toBe(true);
    const before = reads();
    expect(tables.acquire(0)).toBe(held); // still cached: no promise, no read
    expect(reads()).toBe(before);
    tables.release(held);
    tables.release(held);
  });

  it('pins a loaded table once for every request that waited for the load', async () => {
    const { tables, reads } = tablesOver(4);
    // Three requests wait for table 0 and six for others, all loads finishing in one turn.
    const waits = [0, 0, 0, 1, 2, 3, 4, 5, 6].map((i) => tables.acquire(i) as Promise<L2Table>);
    const got = await Promise.all(waits);
    expect(reads()).toBe(7); // one read for the three waiters of table 0
    expect(got[0]).toBe(got[1]);
    expect(got[0]).toBe(got[2]);
    tables.release(got[0]!);
    tables.release(got[1]!);
    await churn(tables, 10, 40);
    // One waiter of table 0 and every other table are still held: none was evicted and reused.
    got.slice(2).forEach((t, k) => expect(holds(t, [0, 1, 2, 3, 4, 5, 6][k]!)).toBe(true));
    for (const t of got.slice(2)) tables.release(t);
    expect(() => tables.release(got[0]!)).toThrow(/released more often than taken/);
  });

  it('fails every waiter of a load that fails, pins nothing, and reads again for the next request', async () => {
    const failing = new Set([3]);
    const { tables, reads } = tablesOver(4, 64 * 1024, failing);
    const waits = [3, 3, 3].map((i) => tables.acquire(i) as Promise<L2Table>);
    const settled = await Promise.allSettled(waits);
    expect(settled.map((r) => r.status)).toEqual(['rejected', 'rejected', 'rejected']);
    expect(reads()).toBe(1);
    failing.clear();
    const again = tables.acquire(3);
    expect(again).toBeInstanceOf(Promise); // not cached by the failed load
    const t = (await again)!;
    expect(holds(t, 3)).toBe(true);
    expect(reads()).toBe(2);
    tables.release(t);
    expect(t.pins).toBe(0);
  });

  it('reads missed tables into evicted tables’ buffers: memory bounded by the cache, not the collector', async () => {
    const { tables } = tablesOver(4);
    const buffers = new Set<Buffer>();
    for (let i = 0; i < 200; i++) {
      const t = (await tables.acquire(i % 50))!;
      expect(holds(t, i % 50)).toBe(true);
      buffers.add(t.data);
      tables.release(t);
    }
    // The cache's four, and the one a load takes before its insert evicts another.
    expect(buffers.size).toBeLessThanOrEqual(5);
  });

  it('keeps enough evicted buffers for a whole batch of misses, so batch after batch reads into them', async () => {
    const { tables } = tablesOver(8);
    const buffers = new Set<Buffer>();
    // Batches of 16 concurrent misses (a queue depth's worth of requests issued in one turn),
    // cycling over 100 tables: every load starts before any ends.
    for (let batch = 0; batch < 20; batch++) {
      const ids = Array.from({ length: 16 }, (_, k) => (batch * 16 + k) % 100);
      const got = await Promise.all(ids.map((i) => tables.acquire(i) as Promise<L2Table>));
      got.forEach((t, k) => {
        expect(holds(t, ids[k]!)).toBe(true);
        buffers.add(t.data);
      });
      for (const t of got) tables.release(t);
    }
    // The first two batches read into new buffers (the first batch's tables are evicted only as
    // the second's loads end); after that every load takes one an eviction gave back. With only 8
    // spares kept, each batch read 8 tables into new buffers: 176 by the twentieth.
    expect(buffers.size).toBeLessThanOrEqual(32);
  });
});
