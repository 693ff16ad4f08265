import { describe, expect, it } from 'vitest';
import { DirtyBitmap, granularityBits, type GranuleRun } from '../../src/bitmaps/dirty-bitmap.js';
import { prng } from '../helpers/prng.js';

/** The naive model: one boolean per granule. */
class Model {
  bits: boolean[];
  constructor(readonly size: number, readonly g: number) {
    this.bits = new Array(Math.ceil(size / g)).fill(false);
  }
  setRange(offset: number, length: number): void {
    for (let i = Math.floor(offset / this.g); i * this.g < offset + length; i++) this.bits[i] = true;
  }
  extents(offset: number, length: number): { offset: number; length: number; dirty: boolean }[] {
    const out: { offset: number; length: number; dirty: boolean }[] = [];
    const stop = Math.min(offset + length, this.size);
    for (let at = offset; at < stop; ) {
      const i = Math.floor(at / this.g);
      const end = Math.min((i + 1) * this.g, stop);
      const last = out[out.length - 1];
      if (last && last.dirty === this.bits[i]) last.length += end - at;
      else out.push({ offset: at, length: end - at, dirty: this.bits[i]! });
      at = end;
    }
    return out;
  }
  bytes(): Uint8Array {
    const out = new Uint8Array(Math.ceil(this.bits.length / 8));
    this.bits.forEach((b, i) => {
      if (b) out[i >> 3]! |= 1 << (i & 7);
    });
    return out;
  }
}

describe('DirtyBitmap', () => {
  it('accepts only power-of-two granularities in the qcow2 range', () => {
    expect(granularityBits(65536)).toBe(16);
    expect(granularityBits(512)).toBe(9);
    for (const bad of [0, 256, 3000, 2 ** 32, -512, 1.5]) expect(() => granularityBits(bad)).toThrow(/granularity/);
  });

  it('stores granules LSB-first as qcow2 does (dirty 0-128K and 1M at 64K = 03 00 01)', () => {
    const b = new DirtyBitmap(4 * 1024 * 1024, 65536);
    b.setRange(0, 128 * 1024);
    b.setRange(1024 * 1024, 65536);
    expect([...b.view(0, 3)]).toEqual([0x03, 0x00, 0x01]);
    expect(b.count()).toBe(3);
  });

  it('marks partial first and last granules and a partial tail granule', () => {
    const b = new DirtyBitmap(10 * 512 + 100, 512);
    expect(b.granules).toBe(11);
    b.setRange(511, 2); // touches granules 0 and 1
    b.setRange(10 * 512 + 99, 1); // the partial tail granule
    expect([0, 1, 2, 10].map((i) => b.get(i))).toEqual([true, true, false, true]);
    expect(b.extents(0, b.size)).toEqual([
      { offset: 0, length: 1024, dirty: true },
      { offset: 1024, length: 10 * 512 - 1024, dirty: false },
      { offset: 10 * 512, length: 100, dirty: true },
    ]);
  });

  it('markRange reports exactly the runs that were clean', () => {
    const b = new DirtyBitmap(64 * 4096, 4096);
    b.setRange(4096 * 3, 4096 * 2); // 3,4
    b.setRange(4096 * 10, 4096); // 10
    const runs: GranuleRun[] = [];
    expect(b.markRange(4096 * 2, 4096 * 10, runs)).toBe(7);
    expect(runs).toEqual([{ first: 2, count: 1 }, { first: 5, count: 5 }, { first: 11, count: 1 }]);
    const again: GranuleRun[] = [];
    expect(b.markRange(4096 * 2, 4096 * 10, again)).toBe(0);
    expect(again).toEqual([]);
  });

  it('merges bitmaps of equal and of different granularity', () => {
    const size = 1024 * 1024;
    const a = new DirtyBitmap(size, 65536);
    const fine = new DirtyBitmap(size, 4096);
    fine.setRange(70000, 10); // granule 17 of 4K → 64K granule 1
    fine.setRange(size - 1, 1);
    a.merge(fine);
    expect(a.extents(0, size).filter((e) => e.dirty)).toEqual([
      { offset: 65536, length: 65536, dirty: true },
      { offset: size - 65536, length: 65536, dirty: true },
    ]);
    const b = new DirtyBitmap(size, 65536);
    b.setRange(0, 1);
    b.merge(a);
    expect(b.count()).toBe(3);
    expect(() => b.merge(new DirtyBitmap(size * 2, 65536))).toThrow(/merge/);
  });

  it('round-trips through its serialized form and masks stray tail bits', () => {
    const b = new DirtyBitmap(13 * 512, 512); // 13 granules: 2 bytes, 3 tail bits unused
    b.load(Uint8Array.of(0xff, 0xff));
    expect(b.count()).toBe(13);
    expect([...b.view()]).toEqual([0xff, 0x1f]);
    const c = new DirtyBitmap(13 * 512, 512);
    c.load(b.view());
    expect(c.extents(0, c.size)).toEqual([{ offset: 0, length: c.size, dirty: true }]);
  });

  it('extents honour maxExtents and non-aligned starts', () => {
    const b = new DirtyBitmap(16 * 512, 512);
    for (let i = 0; i < 16; i += 2) b.setRange(i * 512, 512);
    const ex = b.extents(100, 16 * 512, 3);
    expect(ex).toEqual([
      { offset: 100, length: 412, dirty: true },
      { offset: 512, length: 512, dirty: false },
      { offset: 1024, length: 512, dirty: true },
    ]);
  });

  it('agrees with a naive model under random operations (property test)', () => {
    for (let seed = 1; seed <= 40; seed++) {
      const rnd = prng(seed);
      const r = { next: rnd, int: (n: number) => Math.floor(rnd() * n) };
      const g = 512 << r.int(5);
      const size = 1 + r.int(700 * 512);
      const b = new DirtyBitmap(size, g);
      const m = new Model(size, g);
      for (let step = 0; step < 60; step++) {
        const offset = r.int(size);
        const length = 1 + r.int(Math.min(size - offset, r.next() < 0.2 ? size : 8 * g));
        const op = r.int(10);
        if (op < 6) {
          const runs: GranuleRun[] = [];
          const before = m.bits.slice();
          const added = b.markRange(offset, length, runs);
          m.setRange(offset, length);
          const newly = m.bits.map((v, i) => v && !before[i]).filter(Boolean).length;
          expect(added).toBe(newly);
          for (const run of runs) for (let i = run.first; i < run.first + run.count; i++) expect(before[i]).toBe(false);
        } else if (op < 7) {
          const { first, count } = b.granulesOf(offset, length);
          b.fill(first, count, false);
          for (let i = first; i < first + count; i++) m.bits[i] = false;
        } else if (op < 8) {
          expect(b.anyDirty(offset, length)).toBe(m.extents(offset, length).some((e) => e.dirty));
        } else {
          expect(b.extents(offset, length)).toEqual(m.extents(offset, length));
        }
      }
      expect([...b.view()]).toEqual([...m.bytes()]);
      expect(b.count()).toBe(m.bits.filter(Boolean).length);
      expect(b.extents(0, size)).toEqual(m.extents(0, size));
    }
  });

  it('handles large ranges without per-bit loops (1 TiB disk at 64 KiB)', () => {
    const size = 2 ** 40;
    const b = new DirtyBitmap(size, 65536);
    const t0 = performance.now();
    b.setRange(0, size);
    expect(b.count()).toBe(size / 65536);
    const runs: GranuleRun[] = [];
    expect(b.markRange(0, size, runs)).toBe(0);
    b.fill(1000, 1, false);
    expect(b.extents(0, size)).toHaveLength(3);
    expect(performance.now() - t0).toBeLessThan(2000);
  });
});
