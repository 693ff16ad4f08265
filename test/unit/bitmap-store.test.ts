import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { DirtyBitmap } from '../../src/bitmaps/dirty-bitmap.js';
import {
  DATA_ALIGN,
  HEADER_LENGTH,
  decodeDirectory,
  decodeHeader,
  encodeHeader,
  layoutSidecar,
} from '../../src/bitmaps/sidecar-format.js';
import { SidecarFileStore } from '../../src/bitmaps/store-sidecar-file.js';
import { CountingStore } from '../helpers/counting-store.js';

const MiB = 1024 * 1024;

describe('sidecar file format', () => {
  const metas = [
    { name: 'b0', granularity: 65536, enabled: true },
    { name: 'ünïcode-name', granularity: 512, enabled: false },
  ];

  it('lays out header, directory and aligned data areas, and decodes them back', () => {
    const { header, entries, directory, fileLength } = layoutSidecar(10 * MiB + 1, metas);
    expect(entries.map((e) => e.dataOffset % DATA_ALIGN)).toEqual([0, 0]);
    expect(entries[0]!.dataLength).toBe(Math.ceil(Math.ceil((10 * MiB + 1) / 65536) / 8));
    expect(entries[1]!.dataOffset).toBeGreaterThanOrEqual(entries[0]!.dataOffset + entries[0]!.dataLength);
    const h = decodeHeader(encodeHeader(header));
    expect(h).toEqual(header);
    expect(decodeDirectory(directory, h, fileLength)).toEqual(entries);
  });

  it('rejects corruption at the edge with EUCLEAN', () => {
    const { header, directory, fileLength } = layoutSidecar(MiB, metas);
    const head = encodeHeader(header);
    for (const at of [0, 9, 17, 25, 33, 41, 45]) {
      const bad = Buffer.from(head);
      bad[at]! ^= 0x40;
      expect(() => decodeHeader(bad), `byte ${at}`).toThrow(at === 9 ? /version/ : /bitmap sidecar file/);
    }
    expect(() => decodeHeader(head.subarray(0, 10))).toThrow(/truncated/);
    const dir = Buffer.from(directory);
    dir[16] = 40; // granularity_bits out of range
    expect(() => decodeDirectory(dir, header, fileLength)).toThrow(/checksum/);
    expect(() => decodeDirectory(directory, header, fileLength - DATA_ALIGN)).toThrow(/misplaced/);
    expect(() => decodeDirectory(directory.subarray(0, 20), { ...header, directoryLength: 20 }, fileLength)).toThrow(/checksum|truncated/);
  });
});

describe('SidecarFileStore and BitmapSet', () => {
  let dir: string;
  let path: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'nbdd-bm-'));
    path = join(dir, 'disk.raw.nbdd-bitmaps');
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('creates the file at the first add and keeps bits, flags and names across reopen', async () => {
    const size = 64 * MiB;
    let set = await BitmapSet.open(size, await SidecarFileStore.open(path, size));
    expect(() => readFileSync(path)).toThrow();
    await set.add('b0');
    await set.add('fine', { granularity: 4096, enabled: false });
    await set.mark(0, 4096);
    await set.mark(5 * MiB + 3, 1);
    expect(set.mark(0, 100)).toBeNull(); // already durable: no wait
    await set.close();

    set = await BitmapSet.open(size, await SidecarFileStore.open(path, size));
    expect(set.list().map(({ name, granularity, enabled, dirtyBytes }) => ({ name, granularity, enabled, dirtyBytes }))).toEqual([
      { name: 'b0', granularity: 65536, enabled: true, dirtyBytes: 2 * 65536 },
      { name: 'fine', granularity: 4096, enabled: false, dirtyBytes: 0 },
    ]);
    expect(set.bits('b0').extents(0, size).filter((e) => e.dirty).map((e) => e.offset)).toEqual([0, 5 * MiB]);
    await set.disable('b0');
    await set.remove('fine');
    await set.close();

    const store = await SidecarFileStore.open(path, size);
    expect((await store.load()).map((b) => [b.name, b.enabled])).toEqual([['b0', false]]);
    await store.close([]);
  });

  it('write-intent bits are on disk before mark() resolves, by whole 4 MiB regions; a clean close stores the exact bits', async () => {
    const size = 8 * MiB;
    const set = await BitmapSet.open(size, await SidecarFileStore.open(path, size));
    await set.add('b0', { granularity: 65536 });
    // Read the file behind the daemon's back, as a restart after SIGKILL would.
    const onDisk = (): number[] => {
      const file = readFileSync(path);
      const h = decodeHeader(file.subarray(0, HEADER_LENGTH));
      const [entry] = decodeDirectory(file.subarray(HEADER_LENGTH, HEADER_LENGTH + h.directoryLength), h, file.length);
      return [...file.subarray(entry!.dataOffset, entry!.dataOffset + 16)];
    };
    await set.mark(65536 * 9, 1);
    // Granule 9 lies in the first region (granules 0..63): all of it is dirty on disk.
    expect(onDisk()).toEqual([...Array(8).fill(0xff), ...Array(8).fill(0)]);
    // Another first touch in that region needs no store write; in memory the bits stay exact.
    expect(set.mark(65536 * 40, 1)).toBeNull();
    expect(set.info('b0').dirtyBytes).toBe(2 * 65536);
    expect(onDisk()).toEqual([...Array(8).fill(0xff), ...Array(8).fill(0)]);
    // The second region grows on disk at its first write.
    await set.mark(65536 * 100, 1);
    expect(onDisk()).toEqual(Array(16).fill(0xff));
    await set.close();
    // Granules 9, 40 and 100: byte 1 bit 1, byte 5 bit 0, byte 12 bit 4.
    const exact = Array(16).fill(0);
    exact[1] = 0b10;
    exact[5] = 0b1;
    exact[12] = 0b10000;
    expect(onDisk()).toEqual(exact);
  });

  it('refuses a second opener and a disk of another size', async () => {
    const size = 8 * MiB;
    const set = await BitmapSet.open(size, await SidecarFileStore.open(path, size));
    await set.add('b0');
    await expect(SidecarFileStore.open(path, size)).rejects.toThrow(/in use/);
    await set.close();
    await expect(SidecarFileStore.open(path, size * 2)).rejects.toThrow(/disk/);
    writeFileSync(path, Buffer.alloc(100, 7));
    await expect(SidecarFileStore.open(path, size)).rejects.toMatchObject({ errno: 117 });
  });
});

describe('BitmapSet write-intent batching', () => {
  it('persists all granules dirtied in one turn with one writeBits, and group-commits later turns', async () => {
    const store = new CountingStore();
    const set = await BitmapSet.open(16 * MiB, store, { intentRegion: 0 }); // exact granules: the runs are countable
    await set.add('a', { granularity: 65536 });
    await set.add('b', { granularity: 4096 });
    const waits = [set.mark(0, 4096), set.mark(MiB, 4096), set.mark(2 * MiB, 8192)];
    expect(waits.every((w) => w instanceof Promise)).toBe(true);
    let release!: () => void;
    store.gate = new Promise((r) => (release = r));
    await new Promise((r) => setImmediate(r));
    expect(store.writeBitsCalls).toHaveLength(1);
    expect(store.writeBitsCalls[0]!.map((c) => [c.name, c.runs.length])).toEqual([['a', 3], ['b', 3]]);
    // While that write runs: an already-dirty granule must still wait; new ones gather.
    const same = set.mark(0, 1);
    expect(same).toBeInstanceOf(Promise);
    const later = [set.mark(3 * MiB, 1), set.mark(4 * MiB, 1)];
    release();
    await Promise.all([...waits, same, ...later]);
    expect(store.writeBitsCalls).toHaveLength(2);
    expect(store.writeBitsCalls[1]!.map((c) => c.runs.length)).toEqual([2, 2]);
    expect(set.mark(0, 1)).toBeNull();
  });

  it('fails the writes of a batch whose bits could not be stored, and retries them with the next write', async () => {
    const store = new CountingStore();
    const set = await BitmapSet.open(MiB, store, { intentRegion: 0 });
    const errors: unknown[] = [];
    set.on('persist-error', (e) => errors.push(e));
    await set.add('a');
    store.failNextWriteBits = true;
    await expect(set.mark(0, 1)).rejects.toMatchObject({ errno: 5, message: expect.stringMatching(/dirty bitmap/) });
    expect(errors).toHaveLength(1);
    // Granule 0 is set in memory but not known durable: the next writer waits for a retry.
    const retry = set.mark(0, 1);
    expect(retry).toBeInstanceOf(Promise);
    await retry;
    expect(store.writeBitsCalls[1]!.map((c) => c.runs)).toEqual([[{ first: 0, count: 1 }]]);
    expect(set.mark(0, 1)).toBeNull();
  });

  it('checkpoint starts the new bitmap and stops the old ones at the same instant', async () => {
    const set = await BitmapSet.open(MiB, new CountingStore());
    await set.add('c1');
    await set.mark(0, 1);
    const cp = set.checkpoint('c2');
    // A write in the same turn as the checkpoint lands in c2 only.
    set.mark(65536, 1);
    await cp;
    expect(set.list().map((b) => [b.name, b.enabled, b.dirtyBytes])).toEqual([
      ['c1', false, 65536],
      ['c2', true, 65536],
    ]);
    await expect(set.checkpoint('c2')).rejects.toThrow(/exists/);
    await expect(set.merge('c1', ['c2'])).resolves.toBeUndefined();
    expect(set.info('c1').dirtyBytes).toBe(2 * 65536);
    const frozen = set.freeze('c2');
    await expect(set.clear('c2')).rejects.toMatchObject({ errno: 16 });
    set.release('c2');
    await set.clear('c2');
    expect(frozen.count()).toBe(1);
    expect(set.info('c2').dirtyBytes).toBe(0);
  });

  it('a checkpoint refused (bad granularity, no store, limits) leaves the old bitmaps recording, in memory and in the store', async () => {
    const store = new CountingStore();
    const set = await BitmapSet.open(MiB, store, { maxBitmaps: 2 });
    await set.add('c1');
    await expect(set.checkpoint('c2', { granularity: 1000 })).rejects.toThrow(/granularity/);
    await expect(set.checkpoint('c2', { granularity: 2 ** 40 })).rejects.toThrow(/granularity/);
    const transientOnly = await BitmapSet.open(MiB, null);
    await transientOnly.add('t1');
    await expect(transientOnly.checkpoint('t2', { persistent: true })).rejects.toMatchObject({ errno: 95 });
    expect(transientOnly.info('t1').enabled).toBe(true);
    await set.add('c0', { enabled: false });
    await expect(set.checkpoint('c2')).rejects.toMatchObject({ errno: 28 }); // a third bitmap: past --max-bitmaps 2
    expect(set.list().map((b) => [b.name, b.enabled])).toEqual([
      ['c1', true],
      ['c0', false],
    ]);
    expect(store.setEnabledCalls).toEqual([]);
    await set.mark(0, 1);
    expect(set.info('c1').dirtyBytes).toBe(65536);
  });

  it('validates names and granularities, and refuses persistence without a store', async () => {
    const set = await BitmapSet.open(MiB, null);
    await expect(set.add('')).rejects.toThrow(/non-empty/);
    await expect(set.add('a\nb')).rejects.toThrow(/control/);
    await expect(set.add('x'.repeat(1024))).rejects.toThrow(/1023/);
    await expect(set.add('g', { granularity: 1000 })).rejects.toThrow(/granularity/);
    await expect(set.add('p', { persistent: true })).rejects.toMatchObject({ errno: 95 });
    const info = await set.add('t');
    expect(info.persistent).toBe(false);
    expect(set.mark(0, 1)).toBeNull(); // transient: nothing to wait for
    expect(set.info('t').dirtyBytes).toBe(65536);
    await expect(set.remove('nope')).rejects.toMatchObject({ errno: 2 });
  });
});

it('tail granule dirtyBytes are clipped to the disk size', async () => {
  const set = await BitmapSet.open(100_000, null);
  await set.add('t');
  set.mark(99_999, 1);
  expect(set.info('t').dirtyBytes).toBe(100_000 - 65536);
  expect(new DirtyBitmap(100_000, 65536).granules).toBe(2);
});
