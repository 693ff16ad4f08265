import { describe, expect, it } from 'vitest';
import { BlockQueue } from '../../src/core/queue.js';
import { CopyBeforeWriteLayer, overlayData } from '../../src/layers/copy-before-write.js';
import { prng } from '../helpers/prng.js';
import { TestBackend } from '../helpers/test-backend.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const G = 64 * KiB;

function setup(size = 2 * MiB) {
  const backend = new TestBackend(size);
  for (let i = 0; i < size; i += 512) backend.data.fill((i / 512) & 0xff, i, i + 512);
  const layer = new CopyBeforeWriteLayer(backend);
  const queue = new BlockQueue(layer);
  return { backend, layer, queue };
}

describe('CopyBeforeWriteLayer', () => {
  it('shows the disk as it was at begin while writes, zeroes and trims change it', async () => {
    const { backend, layer, queue } = setup();
    const before = Buffer.from(backend.data);
    const view = layer.begin();
    const viewQ = new BlockQueue(view);
    await Promise.all([
      queue.write(100, Buffer.alloc(70 * KiB, 0xee)),
      queue.writeZeroes(MiB, 3 * G),
      queue.trim(MiB + 5 * G, G),
    ]);
    expect(backend.data.subarray(100, 200).every((b) => b === 0xee)).toBe(true);
    expect((await viewQ.read(0, 2 * MiB)).equals(before)).toBe(true);
    expect(view.stats()).toMatchObject({ copiedGranules: 2 + 3 + 1, scratchMemoryBytes: 6 * G, broken: null });
    // Block status: the zeroed/trimmed granules were data at begin, so the view says data.
    // (TestBackend calls ranges it never wrote holes; the view reports the live status there.)
    expect(await viewQ.blockStatus(MiB, 3 * G)).toEqual([{ length: 3 * G, hole: false, zero: false, depth: 1 }]);
    expect(await viewQ.blockStatus(MiB + 5 * G, G)).toEqual([{ length: G, hole: false, zero: false, depth: 1 }]);
    expect(await viewQ.blockStatus(MiB + 3 * G, G)).toEqual([{ length: G, hole: true, zero: true, depth: 0 }]);
    await layer.end();
    await expect(viewQ.read(0, 512)).rejects.toMatchObject({ errno: 108 });
  });

  it('TRIM on the view releases granules: copies dropped, later writes not copied', async () => {
    const { layer, queue } = setup();
    const view = layer.begin();
    await queue.write(0, Buffer.alloc(2 * G, 1));
    expect(view.stats().copiedGranules).toBe(2);
    await view.trim(0, G + 100); // releases granule 0 only (granule 1 is not wholly inside)
    expect(view.stats()).toMatchObject({ copiedGranules: 1, releasedGranules: 1 });
    await view.trim(4 * G, 4 * G);
    await queue.write(4 * G, Buffer.alloc(4 * G, 2));
    expect(view.stats()).toMatchObject({ copiedGranules: 1, releasedGranules: 5 });
    await expect(view.write()).rejects.toMatchObject({ errno: 1 });
  });

  it('spills to a temporary file past the memory limit and stays exact', async () => {
    const { backend, layer, queue } = setup();
    const before = Buffer.from(backend.data);
    const view = layer.begin({ scratch: { memoryBytes: G, fileBytes: 64 * G } });
    await Promise.all([0, 3, 7, 20].map((g) => queue.write(g * G + 7, Buffer.alloc(1000, 0xab))));
    expect(view.stats()).toMatchObject({ copiedGranules: 4, scratchMemoryBytes: G, scratchFileBytes: 3 * G });
    expect((await view.read(0, 2 * MiB)).equals(before)).toBe(true);
    await layer.end();
  });

  it('break-backup policy: a full scratch store breaks the backup, loudly, and never the guest write', async () => {
    const { backend, layer, queue } = setup();
    const errors: string[] = [];
    layer.on('backup-error', (m: string) => errors.push(m));
    const view = layer.begin({ scratch: { memoryBytes: G, fileBytes: 0 } });
    await queue.write(0, Buffer.alloc(10, 1));
    await queue.write(5 * G, Buffer.alloc(10, 2)); // no room for this copy
    expect(backend.data[5 * G]).toBe(2);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/scratch space is full/);
    await expect(view.read(0, 512)).rejects.toMatchObject({ errno: 5, message: expect.stringMatching(/broken/) });
    expect(view.stats().broken).toMatch(/full/);
    await layer.end();
  });

  it('fail-write policy: the guest write fails with ENOSPC and the backup stays exact', async () => {
    const { backend, layer, queue } = setup();
    const before = Buffer.from(backend.data);
    const view = layer.begin({ scratch: { memoryBytes: G, fileBytes: 0 }, onLimit: 'fail-write' });
    await queue.write(0, Buffer.alloc(10, 1));
    await expect(queue.write(5 * G, Buffer.alloc(10, 2))).rejects.toMatchObject({ errno: 28 });
    expect(backend.data[5 * G]).toBe(before[5 * G]);
    await view.trim(0, G); // frees room
    await queue.write(5 * G, Buffer.alloc(10, 2));
    expect((await view.read(5 * G, G)).equals(before.subarray(5 * G, 6 * G))).toBe(true);
    await layer.end();
  });

  it('agrees with a snapshot under random concurrent writes and view reads (property test)', async () => {
    for (let seed = 1; seed <= 8; seed++) {
      const rnd = prng(seed);
      const r = { next: rnd, int: (n: number) => Math.floor(rnd() * n) };
      const size = 1 * MiB + r.int(8) * 4096;
      const { backend, layer, queue } = setup(size);
      const snapshot = Buffer.from(backend.data);
      const view = layer.begin({ granularity: [4096, G][r.int(2)]!, scratch: { memoryBytes: r.int(4) * G, fileBytes: 64 * MiB } });
      const viewQ = new BlockQueue(view);
      for (let round = 0; round < 15; round++) {
        const ops: Promise<unknown>[] = [];
        for (let i = 0; i < 6; i++) {
          const off = r.int(size - 1);
          const len = 1 + r.int(Math.min(size - off, 200 * KiB) - 1);
          if (r.next() < 0.5) ops.push(queue.write(off, Buffer.alloc(len, 1 + r.int(250))));
          else if (r.next() < 0.5) ops.push(queue.writeZeroes(off, len));
          else ops.push(viewQ.read(off, len).then((b) => expect(b.equals(snapshot.subarray(off, off + len))).toBe(true)));
        }
        await Promise.all(ops);
      }
      expect((await viewQ.read(0, size)).equals(snapshot)).toBe(true);
      await layer.end();
    }
  });
});

describe('overlayData', () => {
  it('replaces changed ranges by data and merges equal neighbours', () => {
    const live = [
      { length: 100, hole: true, zero: true, depth: 0 },
      { length: 100, hole: false, zero: false, depth: 1 },
    ];
    expect(overlayData(live, 1000, [
      { offset: 1000, length: 50, dirty: false },
      { offset: 1050, length: 100, dirty: true },
      { offset: 1150, length: 50, dirty: false },
    ])).toEqual([
      { length: 50, hole: true, zero: true, depth: 0 },
      { length: 150, hole: false, zero: false, depth: 1 },
    ]);
    expect(overlayData(live, 0, [{ offset: 0, length: 200, dirty: false }])).toBe(live);
  });
});
