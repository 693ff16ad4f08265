/**
 * Writing qcow2 images: images made by `nbdd create` as qemu sees them, refcount table growth,
 * FUA and flush durability as seen by qemu-img while the image is still open (with the
 * allocation pool showing as leaked clusters then), freed clusters
 * reused, and describeQcow2 against qemu-img info.
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeQcow2 } from '../../src/backends/qcow2/describe.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { decodeHeader } from '../../src/backends/qcow2/format/index.js';
import { qemuCheck, qemuCreate, qemuIo, qemuMap, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { NBDD, run, runStatus, tempDir } from '../helpers/tools.js';
import { readFileSync } from 'node:fs';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-write-');
});
afterAll(() => dir.remove());

interface QemuInfo {
  'virtual-size': number;
  'cluster-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'full-backing-filename'?: string;
  'format-specific': { data: { compat: string; 'refcount-bits': number; 'extended-l2'?: boolean; 'compression-type': string; corrupt: boolean; 'lazy-refcounts': boolean } };
}

/**
 * `qemu-img check` of an image nbdd still has open: no corruption, and any leaked clusters are
 * the allocation pool nbdd reserved ahead (its counts are durable before clusters are used).
 */
function expectOnlyPoolLeaks(check: { status: number; output: string }): void {
  expect([0, 3], check.output).toContain(check.status);
  expect(check.output).not.toMatch(/ERROR|(?<!No )errors were found|corrupted/);
}

function qemuInfo(path: string): QemuInfo {
  return JSON.parse(run('qemu-img', ['info', '--output=json', path])) as QemuInfo;
}

describe('nbdd create', () => {
  it('makes images qemu accepts, in each cluster size, with and without a backing file', () => {
    for (const [cluster, bytes, size] of [['512', 512, '64M'], ['64K', 65536, '3G'], ['2M', 2 * MiB, '5T']] as const) {
      const path = join(dir.path, `created-${cluster}.qcow2`);
      run(NBDD, ['create', '-f', 'qcow2', path, size, '--cluster-size', cluster]);
      const check = qemuCheck(path);
      expect(check.output).toContain('No errors were found');
      const info = qemuInfo(path);
      expect(info['cluster-size']).toBe(bytes);
      expect(info['format-specific'].data.compat).toBe('1.1');
      // qemu writes into it, and we read what qemu wrote.
      qemuIo(path, ['write -P 0x42 1000 70000']);
      expect(qemuCheck(path).status).toBe(0);
    }
    const base = join(dir.path, 'created-base.qcow2');
    run(NBDD, ['create', base, '5M']);
    run(NBDD, ['create', join(dir.path, 'created-top.qcow2'), '-b', 'created-base.qcow2']);
    const info = qemuInfo(join(dir.path, 'created-top.qcow2'));
    expect(info['virtual-size']).toBe(5 * MiB);
    expect(info['backing-filename']).toBe('created-base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    const bad = runStatus(NBDD, ['create', join(dir.path, 'bad.qcow2'), '1G', '--cluster-size', '1000']);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain('cluster size 1000 must be a power of two');
  });

  it('does not replace an existing image without --force, nor one in use even with it', async () => {
    const path = join(dir.path, 'keep.qcow2');
    run(NBDD, ['create', path, '4M']);
    qemuIo(path, ['write -P 0x5a 0 64k']);
    const again = runStatus(NBDD, ['create', path, '8M']);
    expect(again.status).toBe(1);
    expect(again.stderr).toMatch(/exists.*--force/);
    const img = await openQcow2(path, { readOnly: false });
    try {
      const busy = runStatus(NBDD, ['create', '--force', path, '8M']);
      expect(busy.status).toBe(1);
      expect(busy.stderr).toMatch(/in use/);
    } finally {
      await img.close();
    }
    expect(qemuRaw(path, dir.path).subarray(0, 65536).every((b) => b === 0x5a)).toBe(true);
    run(NBDD, ['create', '--force', path, '8M']);
    expect((await describeQcow2(path)).virtualSize).toBe(8 * MiB);
  });
});

describe('qcow2 writes', () => {
  it('grows the refcount table and blocks (512 B clusters, 64-bit refcounts)', async () => {
    const path = join(dir.path, 'grow.qcow2');
    qemuCreate(path, 4 * MiB, ['cluster_size=512', 'refcount_bits=64']);
    const before = decodeHeader(readFileSync(path).subarray(0, 512));
    const img = await openQcow2(path, { readOnly: false });
    const expected = Buffer.alloc(4 * MiB);
    const writes: Promise<void>[] = [];
    for (let off = 0; off < 4 * MiB; off += 64 * KiB) {
      const data = Buffer.alloc(64 * KiB, 1 + ((off / 65536) % 250));
      data.copy(expected, off);
      writes.push(img.write(off, data));
    }
    await Promise.all(writes);
    await img.close();
    const after = decodeHeader(readFileSync(path).subarray(0, 512));
    expect(after.refcountTableClusters).toBeGreaterThan(before.refcountTableClusters);
    expect(after.refcountTableOffset).not.toBe(before.refcountTableOffset);
    const check = qemuCheck(path);
    expect(check.output).toContain('No errors were found');
    expect(check.status).toBe(0);
    expect(qemuRaw(path, dir.path).equals(expected)).toBe(true);
  });

  it('FUA writes and flushes are visible to qemu while the image stays open', async () => {
    const path = join(dir.path, 'fua.qcow2');
    qemuCreate(path, 8 * MiB);
    const img = await openQcow2(path, { readOnly: false });
    try {
      await img.write(3 * MiB, Buffer.alloc(100 * KiB, 0xf1), { fua: true });
      let raw = qemuRaw(path, dir.path, 'qcow2', true);
      expect(raw.subarray(3 * MiB, 3 * MiB + 100 * KiB).every((b) => b === 0xf1)).toBe(true);
      expectOnlyPoolLeaks(qemuCheck(path, true));
      await img.write(5 * MiB, Buffer.alloc(64 * KiB, 0xf2));
      await img.writeZeroes(3 * MiB, 64 * KiB);
      await img.flush();
      raw = qemuRaw(path, dir.path, 'qcow2', true);
      expect(raw.subarray(5 * MiB, 5 * MiB + 64 * KiB).every((b) => b === 0xf2)).toBe(true);
      expect(raw.subarray(3 * MiB, 3 * MiB + 64 * KiB).every((b) => b === 0)).toBe(true);
      expectOnlyPoolLeaks(qemuCheck(path, true));
    } finally {
      await img.close();
    }
    expect(qemuCheck(path).status).toBe(0); // close gives the pool back
  });

  it('discard frees clusters and later allocations reuse them', async () => {
    const path = join(dir.path, 'reuse.qcow2');
    qemuCreate(path, 64 * MiB);
    const img = await openQcow2(path, { readOnly: false });
    await img.write(0, Buffer.alloc(8 * MiB, 0xaa));
    await img.flush();
    const full = statSync(path).size;
    await img.trim(0, 8 * MiB);
    await img.flush();
    await img.flush();
    expectOnlyPoolLeaks(qemuCheck(path, true)); // the freed clusters wait in the pool
    expect(statSync(path).blocks * 512).toBeLessThan(full / 2); // punched
    await img.write(32 * MiB, Buffer.alloc(8 * MiB, 0xbb));
    await img.close();
    expect(statSync(path).size).toBeLessThanOrEqual(full);
    // Data exactly at guest [32M, 40M), in however many host runs the reused clusters form.
    const map = qemuMap(path).filter((m) => m.data);
    expect(map[0]?.start).toBe(32 * MiB);
    expect(map.reduce((end, m) => (m.start === end ? end + m.length : -1), 32 * MiB)).toBe(40 * MiB);
    expect(qemuCheck(path).status).toBe(0);
  });

  it('zero writes: zero flag on v3, deallocation or zero data on v2', async () => {
    for (const compat of ['1.1', '0.10']) {
      const path = join(dir.path, `zero-${compat}.qcow2`);
      qemuCreate(path, 4 * MiB, [`compat=${compat}`]);
      qemuIo(path, ['write -P 0x11 0 4M']);
      const img = await openQcow2(path, { readOnly: false });
      await img.writeZeroes(64 * KiB, 128 * KiB); // whole clusters
      await img.writeZeroes(300 * KiB, 10 * KiB); // partial
      await img.writeZeroes(1 * MiB, 64 * KiB, { noHole: true });
      await img.close();
      const raw = qemuRaw(path, dir.path);
      const expected = Buffer.alloc(4 * MiB, 0x11);
      expected.fill(0, 64 * KiB, 192 * KiB);
      expected.fill(0, 300 * KiB, 310 * KiB);
      expected.fill(0, MiB, MiB + 64 * KiB);
      expect(raw.equals(expected)).toBe(true);
      const zeroExtents = qemuMap(path).filter((m) => m.zero && !m.data);
      expect(zeroExtents.some((m) => m.start === 64 * KiB && m.length === 128 * KiB)).toBe(true);
      expect(qemuCheck(path).status).toBe(0);
    }
  });
});

describe('describeQcow2', () => {
  it('reports what qemu-img info reports', async () => {
    const base = join(dir.path, 'd-base.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', base, '2M']);
    const mid = join(dir.path, 'd-mid.qcow2');
    qemuCreate(mid, 2 * MiB, ['compat=0.10'], { path: base, format: 'raw' });
    const top = join(dir.path, 'd-top.qcow2');
    qemuCreate(top, 4 * MiB, ['extended_l2=on', 'compression_type=zstd', 'refcount_bits=8', 'lazy_refcounts=on'], { path: 'd-mid.qcow2', format: 'qcow2' });
    run('qemu-img', ['bitmap', '--add', '-g', '131072', top, 'nightly']);
    const d = await describeQcow2(top);
    const q = qemuInfo(top);
    expect(d.virtualSize).toBe(q['virtual-size']);
    expect(d.clusterSize).toBe(q['cluster-size']);
    expect(d.compat).toBe(q['format-specific'].data.compat);
    expect(d.refcountBits).toBe(q['format-specific'].data['refcount-bits']);
    expect(d.extendedL2).toBe(q['format-specific'].data['extended-l2']);
    expect(d.compressionType).toBe(q['format-specific'].data['compression-type']);
    expect(d.lazyRefcounts).toBe(q['format-specific'].data['lazy-refcounts']);
    expect(d.corrupt).toBe(false);
    expect(d.dirty).toBe(false);
    expect(d.backingFile).toBe('d-mid.qcow2');
    expect(d.backingFormat).toBe('qcow2');
    expect(d.backingChain.map((l) => [l.filename, l.format, l.virtualSize])).toEqual([
      [mid, 'qcow2', 2 * MiB],
      [base, 'raw', 2 * MiB],
    ]);
    expect(d.bitmaps).toEqual([{ name: 'nightly', granularity: 131072, flags: ['auto'] }]);
    expect(d.version).toBe(3);
  });
});
