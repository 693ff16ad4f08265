/**
 * Write-intent through the real request path: BlockQueue → DirtyTrackingLayer → backend, with a
 * bitmap store whose writes are held until the test releases them. The invariant: no write (or
 * zero, or trim) reaches the backend before the bits of every granule it touches are durable —
 * whatever batch it came in, and however many writes share a granule. The backend checks it at
 * every call it receives; a test fails on any violation.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import type { BitmapMeta, BitmapStore, BitsChange, StoredBitmap } from '../../src/bitmaps/store.js';
import type { DirtyBitmap } from '../../src/bitmaps/dirty-bitmap.js';
import { Errno } from '../../src/core/errors.js';
import { BlockQueue } from '../../src/core/queue.js';
import { DirtyTrackingLayer } from '../../src/layers/dirty-tracking.js';
import { GatedBackend, turns } from '../helpers/gated-backend.js';
import { TestBackend } from '../helpers/test-backend.js';

const SIZE = 1 << 20;
const G = 64 * 1024;

/** A store that holds every writeBits until released, and knows which granules are durable. */
class HeldStore implements BitmapStore {
  readonly kind = 'held';
  readonly location = 'memory';
  readonly durable = new Set<number>();
  readonly calls: { granules: number[]; release: () => void; fail: (e: Error) => void }[] = [];
  async load(): Promise<StoredBitmap[]> {
    return [];
  }
  async add(_meta: BitmapMeta, _bits: DirtyBitmap): Promise<void> {}
  async remove(): Promise<void> {}
  async setEnabled(): Promise<void> {}
  async writeAll(): Promise<void> {}
  async close(): Promise<void> {}
  writeBits(changes: BitsChange[]): Promise<void> {
    const granules = changes.flatMap((c) => c.runs.flatMap((r) => Array.from({ length: r.count }, (_, i) => r.first + i)));
    return new Promise((resolve, reject) => {
      this.calls.push({
        granules,
        release: () => {
          for (const g of granules) this.durable.add(g);
          resolve();
        },
        fail: reject,
      });
    });
  }
  releaseAll(): void {
    for (const c of this.calls.splice(0)) c.release();
  }
}

let queue: BlockQueue;
let store: HeldStore;
let gate: GatedBackend;
const violations: string[] = [];

/** intentRegion 0: write-intent stores exactly the granules written (the default stores regions). */
async function setup(intentRegion = 0): Promise<void> {
  violations.length = 0;
  store = new HeldStore();
  const bitmaps = await BitmapSet.open(SIZE, store, { intentRegion });
  await bitmaps.add('b0', { granularity: G });
  // The backend below dirty tracking checks the invariant at every mutating call it receives.
  gate = new GatedBackend(new TestBackend(SIZE));
  gate.gated = false;
  const check = (op: string, offset: number, length: number): void => {
    for (let g = Math.floor(offset / G); g * G < offset + length; g++) {
      if (!store.durable.has(g)) violations.push(`${op} ${offset}+${length} reached the backend before granule ${g} was durable`);
    }
  };
  const below = {
    ...gate,
    kind: 'checking',
    size: SIZE,
    caps: gate.caps,
    read: (o: number, l: number) => gate.read(o, l),
    write: (o: number, d: Buffer) => (check('write', o, d.length), gate.write(o, d)),
    writeZeroes: (o: number, l: number) => (check('writeZeroes', o, l), gate.writeZeroes(o, l)),
    trim: (o: number, l: number) => (check('trim', o, l), gate.trim(o, l)),
    flush: () => gate.flush(),
    blockStatus: (o: number, l: number) => gate.blockStatus(o, l),
    close: () => gate.close(),
  };
  queue = new BlockQueue(new DirtyTrackingLayer(below, bitmaps));
}

afterEach(async () => {
  store.releaseAll();
  await queue.close();
});

const data = (n: number): Buffer => Buffer.alloc(n, 0x5a);

describe('write-intent through the queue', () => {
  it('holds a batch of first-touch writes until their bits are durable, persisting them once', async () => {
    await setup();
    const writes = [queue.write(0, data(4096)), queue.writeZeroes(3 * G, 4096), queue.trim(5 * G, G), queue.write(7 * G + 100, data(G))];
    await turns();
    expect(store.calls).toHaveLength(1); // one write of the bits for the whole batch
    expect(store.calls[0]!.granules.sort((a, b) => a - b)).toEqual([0, 3, 5, 7, 8]);
    expect(gate.issued).toHaveLength(0);
    store.releaseAll();
    await Promise.all(writes);
    expect(gate.ops().sort()).toEqual(['trim', 'write', 'write', 'writeZeroes']);
    expect(violations).toEqual([]);
  });

  it('holds a second write to the same granule in the same batch (its bit is set, not durable)', async () => {
    await setup();
    const a = queue.write(0, data(512));
    const b = queue.write(4096, data(512));
    await turns();
    expect(store.calls).toHaveLength(1);
    expect(gate.issued).toHaveLength(0);
    store.releaseAll();
    await Promise.all([a, b]);
    expect(violations).toEqual([]);
  });

  it('holds a write in a later batch to a granule whose bits are still being written', async () => {
    await setup();
    const a = queue.write(0, data(512));
    await turns();
    expect(store.calls).toHaveLength(1);
    const b = queue.write(8192, data(512)); // next batch, same granule 0
    await turns();
    expect(gate.issued).toHaveLength(0);
    store.releaseAll();
    await Promise.all([a, b]);
    expect(gate.ops()).toEqual(['write', 'write']);
    expect(violations).toEqual([]);
  });

  it('passes writes to durable granules straight through, and fails writes whose bits cannot be stored', async () => {
    await setup();
    const first = queue.write(0, data(512));
    await turns();
    store.releaseAll();
    await first;
    await queue.write(1024, data(512)); // granule 0 is durable: no new bits to write
    expect(store.calls).toHaveLength(0);
    const doomed = queue.write(2 * G, data(512));
    await turns();
    store.calls.splice(0)[0]!.fail(new Error('disk on fire'));
    await expect(doomed).rejects.toMatchObject({ errno: Errno.EIO });
    expect(gate.issued.filter((c) => c.offset === 2 * G)).toHaveLength(0);
    expect(violations).toEqual([]);
  });

  it('default intent regions: the first write into a region stores the whole region; later first touches in it go straight through', async () => {
    await setup(256 * 1024); // 4 granules a region in this 1 MiB disk
    const first = queue.write(G + 100, data(512));
    await turns();
    expect(store.calls).toHaveLength(1);
    expect(store.calls[0]!.granules.sort((a, b) => a - b)).toEqual([0, 1, 2, 3]);
    expect(gate.issued).toHaveLength(0);
    store.releaseAll();
    await first;
    await queue.write(3 * G, data(G)); // granule 3: clean in memory, durable on disk already
    expect(store.calls).toHaveLength(0);
    const next = queue.write(4 * G, data(512)); // region 1: held until granules 4..7 are durable
    await turns();
    expect(store.calls[0]!.granules.sort((a, b) => a - b)).toEqual([4, 5, 6, 7]);
    expect(gate.issued.filter((c) => c.offset === 4 * G)).toHaveLength(0);
    store.releaseAll();
    await next;
    expect(violations).toEqual([]);
  });
});
