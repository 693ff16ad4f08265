import { describe, expect, it } from 'vitest';
import { RequestBuffers } from '../../src/core/request-buffers.js';

describe('RequestBuffers', () => {
  it('reuses a large buffer given back whole, and nothing else', () => {
    const pool = new RequestBuffers(4 * 1024 * 1024);
    const a = pool.take(1024 * 1024);
    pool.give(a.subarray(0, 1024)); // a view: ignored
    pool.give(Buffer.alloc(1024 * 1024)); // not from the pool: ignored
    expect(pool.idleBytes).toBe(0);
    pool.give(a);
    pool.give(a); // twice: once
    expect(pool.idleBytes).toBe(1024 * 1024);
    expect(pool.take(1024 * 1024)).toBe(a);
    expect(pool.idleBytes).toBe(0);
  });

  it('reuses a 4 KiB read buffer (the common small READ)', () => {
    const pool = new RequestBuffers();
    const a = pool.take(4096);
    pool.give(a);
    expect(pool.idleBytes).toBe(4096);
    expect(pool.take(4096)).toBe(a);
    expect(pool.take(4096)).not.toBe(a);
  });

  it('leaves buffers below 4 KiB and idle bytes past its bound to the GC', () => {
    const pool = new RequestBuffers(2 * 1024 * 1024);
    const small = pool.take(4095);
    pool.give(small);
    expect(pool.idleBytes).toBe(0);
    const bufs = [1, 2, 3].map(() => pool.take(1024 * 1024));
    for (const b of bufs) pool.give(b);
    expect(pool.idleBytes).toBe(2 * 1024 * 1024);
  });

  it('never recycles a buffer someone keeps (a scratch copy later served by a READ)', () => {
    const pool = new RequestBuffers();
    const held = pool.take(1024 * 1024);
    pool.keep(held);
    pool.give(held); // the server wrote a reply carrying it
    expect(pool.idleBytes).toBe(0);
    expect(pool.take(1024 * 1024)).not.toBe(held);
  });
});
