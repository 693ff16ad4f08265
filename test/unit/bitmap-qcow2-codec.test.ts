/**
 * The qcow2 bitmaps codec against images made by qemu-img and written by qemu-io: the header,
 * extension, directory and tables are parsed here from the file bytes.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DirtyBitmap } from '../../src/bitmaps/dirty-bitmap.js';
import {
  BITMAP_AUTO,
  EXT_BITMAPS as QCOW2_EXT_BITMAPS,
  bitmapDataCluster,
  decodeBitmapDirectory,
  decodeBitmapTable,
  decodeBitmapsExtension,
  encodeBitmapDirectory,
  encodeBitmapTable,
  encodeBitmapsExtension,
  loadBitmapData,
  tableSizeFor,
} from '../../src/backends/qcow2/format/index.js';
import { requireTool } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(() => {
  requireTool('qemu-img');
  requireTool('qemu-io');
  dir = mkdtempSync(join(tmpdir(), 'nbdd-q2bm-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The image's bitmaps, parsed from its bytes with the codec. */
async function readBitmaps(path: string) {
  const file = readFileSync(path);
  const clusterSize = 2 ** file.readUInt32BE(20);
  const diskSize = Number(file.readBigUInt64BE(24));
  const autoclear = file.readBigUInt64BE(88);
  let at = file.readUInt32BE(100);
  let ext: Buffer | null = null;
  for (;;) {
    const type = file.readUInt32BE(at);
    const len = file.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === QCOW2_EXT_BITMAPS) ext = file.subarray(at + 8, at + 8 + len);
    at += 8 + Math.ceil(len / 8) * 8;
  }
  if (!ext) return { autoclear, bitmaps: [] };
  const e = decodeBitmapsExtension(ext, clusterSize);
  const entries = decodeBitmapDirectory(file.subarray(e.directoryOffset, e.directoryOffset + e.directorySize), e.nbBitmaps, { diskSize, clusterSize, fileLength: file.length });
  const bitmaps = [];
  for (const entry of entries) {
    const table = decodeBitmapTable(file.subarray(entry.tableOffset), entry.tableSize, clusterSize, file.length);
    const bits = new DirtyBitmap(diskSize, 2 ** entry.granularityBits);
    await loadBitmapData(bits, table, clusterSize, async (off) => file.subarray(off, off + clusterSize));
    bitmaps.push({ entry, table, bits });
  }
  return { autoclear, bitmaps, ext: e, clusterSize, diskSize };
}

const dirty = (bits: DirtyBitmap) => bits.extents(0, bits.size).filter((x) => x.dirty).map((x) => [x.offset, x.length]);

describe('qcow2 bitmaps codec on qemu-made images', () => {
  it('reads bitmaps added by qemu-img bitmap and marked by qemu-io writes', async () => {
    const img = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', img, '64M']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '65536', img, 'b0']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '512', img, 'fine']);
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', img, 'off']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 128k', '-c', 'write -z 1M 64k', '-c', 'write 10000000 1000', '-c', 'discard 3M 64k', img], { stdio: 'ignore' });
    const { autoclear, bitmaps } = await readBitmaps(img);
    expect(autoclear & 1n).toBe(1n);
    expect(bitmaps.map((b) => [b.entry.name, b.entry.flags, b.entry.granularityBits])).toEqual([
      ['b0', BITMAP_AUTO, 16],
      ['fine', BITMAP_AUTO, 9],
      ['off', 0, 16],
    ]);
    const b0 = bitmaps[0]!.bits;
    expect([...b0.view(0, 3)]).toEqual([0x03, 0x00, 0x01]); // the layout the reference observed
    expect(dirty(b0)).toEqual([
      [0, 2 * 65536],
      [MiB, 65536],
      [3 * MiB, 65536],
      [Math.floor(10000000 / 65536) * 65536, 65536],
    ]);
    expect(dirty(bitmaps[1]!.bits)).toEqual([
      [0, 128 * 1024],
      [MiB, 65536],
      [3 * MiB, 65536],
      [Math.floor(10000000 / 512) * 512, Math.ceil(10001000 / 512) * 512 - Math.floor(10000000 / 512) * 512],
    ]);
    expect(bitmaps[2]!.bits.count()).toBe(0);
    // Clean clusters have table entry 0; the one dirty data cluster of b0 is allocated.
    expect(bitmaps[0]!.table.map((e) => e.kind)).toEqual(['data']);
  });

  it('round-trips what it decodes, and rejects what QEMU rejects', async () => {
    const img = join(dir, 'b.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    execFileSync('qemu-img', ['bitmap', '--add', img, 'x']);
    const { ext, bitmaps, clusterSize, diskSize } = await readBitmaps(img);
    const file = readFileSync(img);
    const dirBytes = file.subarray(ext!.directoryOffset, ext!.directoryOffset + ext!.directorySize);
    expect(encodeBitmapDirectory(bitmaps.map((b) => b.entry)).equals(dirBytes)).toBe(true);
    expect(encodeBitmapsExtension(ext!).equals(encodeBitmapsExtension(decodeBitmapsExtension(encodeBitmapsExtension(ext!), clusterSize!)))).toBe(true);
    expect(encodeBitmapTable(bitmaps[0]!.table).equals(file.subarray(bitmaps[0]!.entry.tableOffset, bitmaps[0]!.entry.tableOffset + 8))).toBe(true);
    const geometry = { diskSize: diskSize!, clusterSize: clusterSize!, fileLength: file.length };
    const mutate = (at: number, value: number) => {
      const d = Buffer.from(dirBytes);
      d[at] = value;
      return () => decodeBitmapDirectory(d, 1, geometry);
    };
    expect(mutate(16, 2)).toThrow(/type 2/);
    expect(mutate(15, 4)).toThrow(/unknown flags/);
    expect(mutate(17, 8)).toThrow(/granularity_bits/);
    expect(mutate(23, 1)).toThrow(/extra data/);
    expect(mutate(11, 9)).toThrow(/table size/);
    expect(() => decodeBitmapTable(Buffer.from('0000000000000002', 'hex'), 1, 65536, 1 << 20)).toThrow(/reserved/);
    expect(() => decodeBitmapTable(Buffer.from('0000000000010001', 'hex'), 1, 65536, 1 << 20)).toThrow(/all-ones/);
    expect(decodeBitmapTable(Buffer.from('0000000000000001', 'hex'), 1, 65536, 1 << 20)).toEqual([{ kind: 'ones' }]);
  });

  it('builds data clusters only where bits are set, with sizes QEMU expects', () => {
    expect(tableSizeFor(64 * MiB, 65536, 65536)).toBe(1);
    expect(tableSizeFor(2 ** 40, 512, 65536)).toBe(2 ** 31 / 8 / 65536);
    const bits = new DirtyBitmap(2 ** 36, 512); // 16 MiB of bits: 256 clusters
    expect(bitmapDataCluster(bits, 7, 65536)).toBeNull();
    bits.setRange(7 * 65536 * 8 * 512 + 512 * 9, 1);
    const c = bitmapDataCluster(bits, 7, 65536)!;
    expect(c.length).toBe(65536);
    expect([c[1], c.reduce((n, b) => n + b, 0)]).toEqual([2, 2]);
  });
});
