import { describe, expect, it } from 'vitest';
import { ReadSlab } from '../../src/nbd/read-slab.js';

describe('ReadSlab', () => {
  it('gives the room of the last take back to the next read, and only that', () => {
    const slab = new ReadSlab();
    const first = slab.region();
    const a = slab.take(100);
    expect(a.buffer).toBe(first.buffer);
    const b = slab.take(50);
    slab.reuse(a); // not the last take: nothing happens
    expect(slab.region().byteOffset).toBe(b.byteOffset + 50);
    slab.reuse(b);
    expect(slab.region().byteOffset).toBe(b.byteOffset);
    slab.reuse(b); // twice: b no longer ends where the slab's tail starts
    expect(slab.region().byteOffset).toBe(b.byteOffset);
  });

  it('ignores bytes of a slab it has since replaced', () => {
    const slab = new ReadSlab();
    let last = slab.take(0);
    // Fill the slab until region() has to start a new one.
    while (slab.region().buffer === last.buffer) last = slab.take(64 * 1024);
    const fresh = slab.region();
    slab.reuse(last);
    expect(slab.region().byteOffset).toBe(fresh.byteOffset);
    expect(slab.region().buffer).toBe(fresh.buffer);
  });
});
