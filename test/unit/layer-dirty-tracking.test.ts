import { describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { BlockQueue } from '../../src/core/queue.js';
import { DirtyTrackingLayer } from '../../src/layers/dirty-tracking.js';
import { CountingStore } from '../helpers/counting-store.js';
import { TestBackend } from '../helpers/test-backend.js';

const MiB = 1024 * 1024;

async function stack(size = 4 * MiB) {
  const store = new CountingStore();
  const backend = new TestBackend(size);
  const bitmaps = await BitmapSet.open(size, store);
  await bitmaps.add('b0', { granularity: 65536 });
  const layer = new DirtyTrackingLayer(backend, bitmaps);
  const queue = new BlockQueue(layer);
  // Record the backend's write calls in the store's log, to check ordering.
  const write = backend.write.bind(backend);
  backend.write = (o, d, opt) => {
    store.log.push(`write@${o}`);
    return write(o, d, opt);
  };
  return { store, backend, bitmaps, layer, queue };
}

describe('DirtyTrackingLayer', () => {
  it('persists the marks of a whole batch once, before any write of the batch reaches the backend', async () => {
    const { store, queue, bitmaps } = await stack();
    await Promise.all([0, 1, 2, 3].map((i) => queue.write(i * MiB, Buffer.alloc(4096, i + 1))));
    expect(store.writeBitsCalls).toHaveLength(1);
    expect(store.log.slice(0, 2)).toEqual(['writeBits', 'writeBits-done']);
    expect(store.log.slice(2).sort()).toEqual(['write@0', 'write@1048576', 'write@2097152', 'write@3145728']);
    expect(bitmaps.info('b0').dirtyBytes).toBe(4 * 65536);
    // Steady state: the same granules again cost no store call.
    await Promise.all([0, 1, 2, 3].map((i) => queue.write(i * MiB + 4096, Buffer.alloc(4096, 9))));
    expect(store.writeBitsCalls).toHaveLength(1);
  });

  it('marks WRITE_ZEROES and TRIM, not READ, FLUSH or BLOCK_STATUS', async () => {
    const { queue, bitmaps } = await stack();
    await queue.read(0, 65536);
    await queue.flush();
    await queue.blockStatus(0, MiB);
    expect(bitmaps.info('b0').dirtyBytes).toBe(0);
    await queue.writeZeroes(MiB, 65536 * 2);
    await queue.trim(3 * MiB + 1, 1);
    expect(bitmaps.bits('b0').extents(0, 4 * MiB).filter((e) => e.dirty)).toEqual([
      { offset: MiB, length: 2 * 65536, dirty: true },
      { offset: 3 * MiB, length: 65536, dirty: true },
    ]);
  });

  it('fails a write whose marks cannot be stored, without touching the backend', async () => {
    const { store, queue, backend } = await stack();
    store.failNextWriteBits = true;
    await expect(queue.write(0, Buffer.alloc(512, 1))).rejects.toMatchObject({ errno: 5 });
    expect(backend.calls.filter((c) => c.op === 'write')).toHaveLength(0);
    await queue.write(0, Buffer.alloc(512, 2));
    expect(backend.data[0]).toBe(2);
  });

  it('exports qemu:dirty-bitmap:NAME contexts with the DIRTY flag', async () => {
    const { queue, layer, bitmaps } = await stack();
    await queue.write(65536, Buffer.alloc(1));
    await bitmaps.add('b1', { granularity: 512 });
    await queue.write(0, Buffer.alloc(1));
    const contexts = layer.metaContexts();
    expect(contexts.map((c) => c.name)).toEqual(['qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b1']);
    expect(await contexts[0]!.extents(0, 4 * MiB)).toEqual([
      { length: 2 * 65536, flags: 1 },
      { length: 4 * MiB - 2 * 65536, flags: 0 },
    ]);
    expect(await contexts[1]!.extents(100, 1000)).toEqual([
      { length: 412, flags: 1 },
      { length: 588, flags: 0 },
    ]);
    await bitmaps.remove('b1');
    await expect(contexts[1]!.extents(0, 512)).rejects.toThrow(/no bitmap/);
  });

  it('disabled bitmaps do not record; close stores the bitmaps then closes the backend', async () => {
    const { queue, bitmaps, backend, store } = await stack();
    await bitmaps.disable('b0');
    await queue.write(0, Buffer.alloc(1));
    expect(bitmaps.info('b0').dirtyBytes).toBe(0);
    let closedBitmaps = 0;
    store.close = async (b) => {
      closedBitmaps = b.length;
      expect(backend.closed).toBe(false);
    };
    await queue.close();
    expect(closedBitmaps).toBe(1);
    expect(backend.closed).toBe(true);
  });
});
