/** combineStatus: base:allocation and qemu:allocation-depth extents merged into backend Extents. */
import { describe, expect, it } from 'vitest';
import { combineStatus } from '../../src/backends/nbd.js';

describe('combineStatus', () => {
  it('maps base:allocation flags and defaults the depth without allocation-depth', () => {
    expect(combineStatus([{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }, { length: 512, flags: 2 }], undefined, 1 << 20)).toEqual([
      { length: 4096, hole: false, zero: false, depth: 1 },
      { length: 8192, hole: true, zero: true, depth: 0 },
      { length: 512, hole: false, zero: true, depth: 1 },
    ]);
  });

  it('splits at both contexts boundaries, merges equal neighbours and stops at the shorter one', () => {
    const allocation = [
      { length: 3000, flags: 0 },
      { length: 5000, flags: 3 },
    ];
    const depth = [
      { length: 1000, flags: 1 },
      { length: 1000, flags: 1 },
      { length: 2000, flags: 2 },
      { length: 2000, flags: 0 },
    ];
    expect(combineStatus(allocation, depth, 1 << 20)).toEqual([
      { length: 2000, hole: false, zero: false, depth: 1 },
      { length: 1000, hole: false, zero: false, depth: 2 },
      { length: 1000, hole: true, zero: true, depth: 2 },
      { length: 2000, hole: true, zero: true, depth: 0 },
    ]);
  });

  it('clips to the limit', () => {
    expect(combineStatus([{ length: 65536, flags: 0 }], [{ length: 65536, flags: 1 }], 1000)).toEqual([{ length: 1000, hole: false, zero: false, depth: 1 }]);
  });
});
