/**
 * The BitmapSet's summary (granules dirty in every enabled bitmap, which lets a write skip the
 * bitmaps): whatever the operations between writes, every enabled bitmap ends up with exactly the
 * bits it would have if each write marked each bitmap.
 */
import { describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { DirtyBitmap } from '../../src/bitmaps/dirty-bitmap.js';
import { CountingStore } from '../helpers/counting-store.js';
import { prng } from '../helpers/prng.js';

const MiB = 1024 * 1024;
const KiB = 1024;

/** Marks and waits for durability, as the dirty-tracking layer does before a write. */
async function write(set: BitmapSet, offset: number, length: number): Promise<void> {
  await set.mark(offset, length);
}

describe('BitmapSet summary', () => {
  it('a cleared bitmap records a write into granules the others have dirty', async () => {
    const set = await BitmapSet.open(4 * MiB, null);
    for (const n of ['a', 'b', 'c']) await set.add(n);
    await write(set, 0, 4096);
    await set.clear('b');
    await write(set, 0, 4096);
    expect(set.bits('b').get(0)).toBe(true);
  });

  it('a bitmap enabled, added or started by a checkpoint records writes into granules the others have dirty', async () => {
    const set = await BitmapSet.open(4 * MiB, null);
    await set.add('a');
    await set.add('b');
    await set.add('off', { enabled: false });
    await write(set, 0, 4096);
    expect(set.bits('off').get(0)).toBe(false);
    await set.enable('off');
    await write(set, 0, 4096);
    expect(set.bits('off').get(0)).toBe(true);
    await set.add('late');
    await write(set, 0, 4096);
    expect(set.bits('late').get(0)).toBe(true);
    await write(set, MiB, 4096);
    await set.checkpoint('cp', { disable: ['late'] });
    await write(set, MiB, 4096);
    expect(set.bits('cp').get(MiB / 65536)).toBe(true);
  });

  it('works at the finest granularity enabled: a 4 KiB bitmap gets the second 4 KiB of a 64 KiB granule', async () => {
    const set = await BitmapSet.open(4 * MiB, null);
    await set.add('coarse', { granularity: 64 * KiB });
    await set.add('fine', { granularity: 4 * KiB });
    await write(set, 64 * KiB, 4096);
    await write(set, 68 * KiB, 4096);
    expect([16, 17, 18].map((g) => set.bits('fine').get(g))).toEqual([true, true, false]);
    // A coarser bitmap enabled later: the summary must not stay at a granularity it skips over.
    await set.add('fine512', { granularity: 512 });
    await write(set, 64 * KiB, 512);
    await write(set, 64 * KiB + 512, 512);
    expect([128, 129, 130].map((g) => set.bits('fine512').get(g))).toEqual([true, true, false]);
  });

  it('with no room for a summary in the memory limit, writes still mark every bitmap', async () => {
    const set = await BitmapSet.open(1024 * MiB, null, { maxMemoryBytes: 5 * KiB }); // 2 KiB per bitmap
    await set.add('a');
    await set.add('b');
    await write(set, 0, 4096);
    await set.clear('b');
    await write(set, 0, 4096);
    expect([set.bits('a').get(0), set.bits('b').get(0)]).toEqual([true, true]);
  });

  it('keeps write-intent: a write into dirty granules still waits for a store write in flight', async () => {
    const store = new CountingStore();
    const set = await BitmapSet.open(16 * MiB, store, { intentRegion: 0 });
    await set.add('a');
    await set.add('b');
    let release!: () => void;
    store.gate = new Promise((r) => (release = r));
    const first = set.mark(0, 4096);
    expect(first).toBeInstanceOf(Promise);
    await new Promise((r) => setImmediate(r));
    const again = set.mark(0, 4096); // granule dirty everywhere, but not yet durable
    expect(again).toBeInstanceOf(Promise);
    release();
    await Promise.all([first, again]);
    expect(set.mark(0, 4096)).toBeNull();
  });

  it('random operations leave every bitmap as marking each one on every write would', async () => {
    for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
      const rnd = prng(seed);
      const size = 2 * MiB + 3 * KiB;
      const set = await BitmapSet.open(size, null);
      const model = new Map<string, { bits: DirtyBitmap; enabled: boolean }>();
      const granularities = [512, 4 * KiB, 64 * KiB];
      let next = 0;
      const add = async (enabled = rnd() < 0.8): Promise<void> => {
        const name = `b${next++}`;
        const granularity = granularities[Math.floor(rnd() * granularities.length)]!;
        await set.add(name, { granularity, enabled });
        model.set(name, { bits: new DirtyBitmap(size, granularity), enabled });
      };
      for (let i = 0; i < 3; i++) await add();
      for (let step = 0; step < 400; step++) {
        const names = [...model.keys()];
        const pick = names[Math.floor(rnd() * names.length)];
        const r = rnd();
        if (r < 0.7 || !pick) {
          // Mostly writes over a few hot spots, so granules get dirty everywhere and are written again.
          const offset = Math.min(Math.floor(rnd() * 8) * 256 * KiB + Math.floor(rnd() * 64) * 512, size - 1);
          const length = Math.min(1 + Math.floor(rnd() * 20 * KiB), size - offset);
          await write(set, offset, length);
          for (const m of model.values()) if (m.enabled) m.bits.setRange(offset, length);
        } else if (r < 0.78) {
          await set.clear(pick);
          model.get(pick)!.bits.clear();
        } else if (r < 0.84) {
          const enabled = rnd() < 0.5;
          await (enabled ? set.enable(pick) : set.disable(pick));
          model.get(pick)!.enabled = enabled;
        } else if (r < 0.89 && model.size < 6) {
          await add();
        } else if (r < 0.93 && model.size > 1) {
          await set.remove(pick);
          model.delete(pick);
        } else if (r < 0.97) {
          const target = names[Math.floor(rnd() * names.length)]!;
          await set.merge(target, [pick]);
          model.get(target)!.bits.merge(model.get(pick)!.bits);
        } else {
          const name = `b${next++}`;
          await set.checkpoint(name);
          for (const m of model.values()) m.enabled = false;
          model.set(name, { bits: new DirtyBitmap(size, 64 * KiB), enabled: true });
        }
        for (const [name, m] of model) {
          expect(Buffer.from(set.bits(name).view()).equals(Buffer.from(m.bits.view())), `seed ${seed} step ${step}: bitmap ${name}`).toBe(true);
        }
      }
    }
  });
});
