/**
 * Qcow2BitmapStore against a fake host (bump allocator over a scratch file): layout policy,
 * write-intent offsets, frees, and which loaded bitmaps are trusted. QEMU interop is in
 * test/interop/sidecar-qcow2.test.ts.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DirtyBitmap } from '../../src/bitmaps/dirty-bitmap.js';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { BITMAP_AUTO, BITMAP_IN_USE, decodeBitmapDirectory, decodeBitmapTable, type BitmapsExtension } from '../../src/backends/qcow2/format/bitmaps.js';
import { Qcow2BitmapStore, type Qcow2BitmapHost } from '../../src/bitmaps/store-qcow2.js';
import { NodeFilePort, type FilePort } from '../../src/io/file-port.js';
import { RecordingPort } from '../helpers/recording-port.js';

const CS = 65536;
const DISK = 64 * 1024 * 1024;

class FakeHost implements Qcow2BitmapHost {
  readonly path = 'fake.qcow2';
  readonly clusterSize = CS;
  readonly diskSize = DISK;
  bitmapsExtension: BitmapsExtension | null = null;
  bitmapsConsistentAtOpen = true;
  next = 1; // cluster 0 is the header
  freed: number[] = [];
  commits = 0;
  constructor(readonly port: FilePort) {}
  allocateClusters(n: number): number {
    const at = this.next * CS;
    this.next += n;
    return at;
  }
  freeClusters(offset: number, n: number): void {
    for (let k = 0; k < n; k++) this.freed.push(offset / CS + k);
  }
  async commitMetadata(): Promise<void> {
    this.commits++;
  }
  async writeBitmapsExtension(ext: BitmapsExtension | null): Promise<void> {
    this.bitmapsExtension = ext;
  }
  async directory() {
    const e = this.bitmapsExtension!;
    const dir = await this.port.readAt(Buffer.alloc(e.directorySize), e.directoryOffset);
    const fileLength = await this.port.length();
    return decodeBitmapDirectory(dir, e.nbBitmaps, { diskSize: DISK, clusterSize: CS, fileLength });
  }
}

describe('Qcow2BitmapStore', () => {
  let dir: string;
  let port: NodeFilePort;
  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'nbdd-q2s-'));
    port = await NodeFilePort.open(join(dir, 'img'), { readOnly: false, create: true });
  });
  afterEach(async () => {
    await port.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('preallocates data clusters for enabled bitmaps only, writes intent in place, frees old sets', async () => {
    const host = new FakeHost(port);
    const store = new Qcow2BitmapStore(host);
    expect(await store.load()).toEqual([]);
    const on = new DirtyBitmap(DISK, 512); // 16 KiB of bits: one data cluster
    const off = new DirtyBitmap(DISK, 65536);
    await store.add({ name: 'on', granularity: 512, enabled: true }, on);
    await store.add({ name: 'off', granularity: 65536, enabled: false }, off);
    const entries = await host.directory();
    expect(entries.map((e) => [e.name, e.flags, e.granularityBits])).toEqual([['on', BITMAP_AUTO, 9], ['off', 0, 16]]);
    const tables = await Promise.all(entries.map(async (e) => decodeBitmapTable(await port.readAt(Buffer.alloc(8 * e.tableSize), e.tableOffset), e.tableSize, CS, await port.length())));
    expect(tables.map((t) => t.map((x) => x.kind))).toEqual([['data'], ['zeros']]);
    // The first add's set was freed when the second add wrote a new one.
    expect(host.freed.length).toBeGreaterThan(0);

    const runs: { first: number; count: number }[] = [];
    on.markRange(512 * 8 * 100 + 3 * 512, 1, runs);
    await store.writeBits([{ name: 'on', bits: on, runs }, { name: 'gone', bits: on, runs }]);
    const dataAt = (tables[0]![0] as { offset: number }).offset;
    expect((await port.readAt(Buffer.alloc(1), dataAt + 100))[0]).toBe(1 << 3);
  });

  it('under a BitmapSet: intent regions on disk while it runs, the exact bits after a clean close (in place)', async () => {
    const host = new FakeHost(port);
    const set = await BitmapSet.open(DISK, new Qcow2BitmapStore(host));
    await set.add('b', { granularity: 65536 });
    const [entry] = await host.directory();
    const [data] = decodeBitmapTable(await port.readAt(Buffer.alloc(8 * entry!.tableSize), entry!.tableOffset), entry!.tableSize, CS, await port.length());
    const at = (data as { offset: number }).offset;
    const stored = async (): Promise<number[]> => [...(await port.readAt(Buffer.alloc(16), at))];
    await set.mark(65536 * 70, 1); // region 1 (granules 64..127)
    expect(await stored()).toEqual([...Array(8).fill(0), ...Array(8).fill(0xff)]);
    const allocated = host.next;
    await set.close();
    const exact = Array(16).fill(0);
    exact[8] = 1 << 6; // granule 70
    expect(await stored()).toEqual(exact);
    expect(host.next).toBe(allocated); // written in place: no new clusters, no new directory
    expect((await new Qcow2BitmapStore(host).load()).map((b) => [b.name, b.bits.count()])).toEqual([['b', 1]]);
  });

  it('trusts neither in_use bitmaps nor any bitmap of an image without the autoclear bit', async () => {
    const host = new FakeHost(port);
    const writer = new Qcow2BitmapStore(host);
    await writer.load();
    const a = new DirtyBitmap(DISK, 65536);
    a.setRange(0, 1);
    await writer.add({ name: 'a', granularity: 65536, enabled: true }, a);
    await writer.add({ name: 'b', granularity: 65536, enabled: true }, new DirtyBitmap(DISK, 65536));
    // Mark 'b' in_use in the directory, as a QEMU crash leaves it.
    const e = host.bitmapsExtension!;
    const dir = await port.readAt(Buffer.alloc(e.directorySize), e.directoryOffset);
    const second = Math.ceil((24 + 1) / 8) * 8;
    dir.writeUInt32BE(BITMAP_AUTO | BITMAP_IN_USE, second + 12);
    await port.writeAt(dir, e.directoryOffset);

    const reader = new Qcow2BitmapStore(host);
    const loaded = await reader.load();
    expect(loaded.map((b) => [b.name, b.enabled, b.bits.count()])).toEqual([['a', true, 1]]);
    expect((await host.directory()).map((x) => x.name)).toEqual(['a']); // dropped from the image too

    host.bitmapsConsistentAtOpen = false;
    expect(await new Qcow2BitmapStore(host).load()).toEqual([]);
    expect(host.bitmapsExtension).toBeNull();
  });

  it('adds, removes and flips one bitmap without rewriting the others (their tables and data stay put)', async () => {
    const host = new FakeHost(port);
    const store = new Qcow2BitmapStore(host);
    await store.load();
    for (const name of ['a', 'b']) await store.add({ name, granularity: 65536, enabled: true }, new DirtyBitmap(DISK, 65536));
    const before = new Map((await host.directory()).map((e) => [e.name, e.tableOffset]));
    const dirBefore = host.bitmapsExtension!.directoryOffset;
    host.freed = [];
    const allocatedBefore = host.next;
    await store.add({ name: 'c', granularity: 65536, enabled: true }, new DirtyBitmap(DISK, 65536));
    // One data cluster and one table cluster for 'c', one for the directory; only the old directory is freed.
    expect(host.next - allocatedBefore).toBe(3);
    expect(host.freed).toEqual([dirBefore / CS]);
    const after = new Map((await host.directory()).map((e) => [e.name, e.tableOffset]));
    expect(after.get('a')).toBe(before.get('a'));
    expect(after.get('b')).toBe(before.get('b'));

    host.freed = [];
    await store.setEnabled('b', false); // flags only: a new directory, b keeps its clusters
    expect((await host.directory()).find((e) => e.name === 'b')).toMatchObject({ tableOffset: before.get('b'), flags: 0 });
    expect(host.freed).toHaveLength(1);

    host.freed = [];
    await store.remove('a');
    expect((await host.directory()).map((e) => e.name)).toEqual(['b', 'c']);
    expect(host.freed.sort((x, y) => x - y)).toHaveLength(3); // a's data and table, the old directory

    // A reopened store takes the bitmaps as they are: nbdd's layout needs no rewrite at load.
    const commits = host.commits;
    const reopened = await new Qcow2BitmapStore(host).load();
    expect(reopened.map((b) => b.name)).toEqual(['b', 'c']);
    expect(host.commits).toBe(commits);
  });

  it('write-intent bits are durable when writeBits returns: a power loss right after keeps them', async () => {
    const rec = new RecordingPort(port);
    const host = new FakeHost(rec);
    const store = new Qcow2BitmapStore(host);
    await store.load();
    const bits = [0, 1].map(() => new DirtyBitmap(DISK, 512));
    await store.add({ name: 'a', granularity: 512, enabled: true }, bits[0]!);
    await store.add({ name: 'b', granularity: 512, enabled: true }, bits[1]!);
    // Image data written before the intent and not synced: the intent must not wait for it.
    await rec.writeAt(Buffer.alloc(CS, 0xdd), host.allocateClusters(1));
    const syncs = rec.syncs.length;
    const changes = bits.map((b, i) => {
      const runs: { first: number; count: number }[] = [];
      b.markRange(512 * 8 * (10 + i) + 512 * 5, 512 * 3, runs); // bits 5..7 of byte 10 (a) and 11 (b)
      return { name: i === 0 ? 'a' : 'b', bits: b, runs };
    });
    await store.writeBits(changes);
    const t = rec.tick();
    // A power loss right now, the page cache dropping everything that was not made durable:
    const crashed = rec.crashImage(Buffer.alloc(0), t, () => 1);
    const entries = await host.directory();
    for (const [i, e] of entries.entries()) {
      const table = decodeBitmapTable(await port.readAt(Buffer.alloc(8 * e.tableSize), e.tableOffset), e.tableSize, CS, await port.length());
      const dataAt = (table[0] as { offset: number }).offset;
      expect(crashed[dataAt + 10 + i], e.name).toBe(0b11100000);
    }
    // The engine here (node:fs) syncs the whole file once for both; io_uring syncs the two ranges.
    expect(rec.syncs.length - syncs).toBeLessThanOrEqual(1);
  });
});
