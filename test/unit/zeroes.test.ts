import { describe, expect, it } from 'vitest';
import { isAllZero } from '../../src/core/zeroes.js';

describe('isAllZero', () => {
  it('is true for empty and all-zero buffers of any length, across chunk ends', () => {
    for (const n of [0, 1, 4096, 65535, 65536, 65537, 200_000]) expect(isAllZero(Buffer.alloc(n))).toBe(true);
  });

  it('finds one non-zero byte anywhere: either end, the middle, the chunk boundary, the last chunk', () => {
    const n = 200_000;
    for (const at of [0, 1, 65535, 65536, 100_000, 196_608, n - 2, n - 1]) {
      const b = Buffer.alloc(n);
      b[at] = 1;
      expect(isAllZero(b)).toBe(false);
    }
  });

  it('reads only the view it is given', () => {
    const b = Buffer.alloc(8192, 0xff);
    b.fill(0, 1024, 5120);
    expect(isAllZero(b.subarray(1024, 5120))).toBe(true);
    expect(isAllZero(b.subarray(1023, 5120))).toBe(false);
    expect(isAllZero(b.subarray(1024, 5121))).toBe(false);
  });
});
