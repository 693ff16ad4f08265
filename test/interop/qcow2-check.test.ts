/**
 * `nbdd check` against `qemu-img check` on the same images: clean images of every layout report
 * nothing (and the same allocation figures), damage is found with qemu's categories and counts,
 * repairs leave qemu-img check clean and every guest byte as it was, the dirty and corrupt bits go
 * once the image is consistent, and the writable open refuses what the check calls corrupt.
 * Also the overlap check: a write aimed at live metadata fails with EIO and marks the image corrupt.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkQcow2 } from '../../src/backends/qcow2/check/index.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { decodeHeader } from '../../src/backends/qcow2/format/index.js';
import { NbddError } from '../../src/core/errors.js';
import { qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { patch, u64 } from '../helpers/patch.js';
import { NBDD, runStatus, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let n = 0;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-check-');
});
afterAll(() => dir.remove());

interface QemuCheckJson {
  corruptions?: number;
  leaks?: number;
  'allocated-clusters'?: number;
  'image-end-offset'?: number;
}

function qemuCheckJson(path: string): { status: number; json: QemuCheckJson } {
  const r = runStatus('qemu-img', ['check', '--output=json', path]);
  return { status: r.status, json: r.stdout.trim() ? (JSON.parse(r.stdout) as QemuCheckJson) : {} };
}

function image(opts: string[] = [], size = 8 * MiB): string {
  const path = join(dir.path, `img-${n++}.qcow2`);
  qemuCreate(path, size, opts);
  qemuIo(path, ['write -P 0x11 0 192k', 'write -P 0x22 3M 64k', 'write -z 5M 64k', 'write -P 0x33 7M 4k']);
  return path;
}

/** Where things are: first refcount block, first L2 table, the data cluster of guest 0. */
function layout(path: string): { cs: number; refblock: number; l1: number; l2: number; data: number } {
  const file = readFileSync(path);
  const h = decodeHeader(file.subarray(0, 4096));
  const refblock = Number(file.readBigUInt64BE(h.refcountTableOffset));
  const l2 = Number(file.readBigUInt64BE(h.l1TableOffset) & 0x00fffffffffffe00n);
  const data = Number(file.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
  return { cs: 2 ** h.clusterBits, refblock, l1: h.l1TableOffset, l2, data };
}

/** Sets the 16-bit refcount of host cluster `c`. */
function setRefcount(path: string, c: number, v: number): void {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  patch(path, layout(path).refblock + 2 * c, b);
}

function nbddCheck(args: string[]): { status: number; stdout: string; stderr: string } {
  return runStatus(NBDD, ['check', ...args]);
}

describe('nbdd check on clean images agrees with qemu-img check', () => {
  const layouts: [string, () => string][] = [
    ['v3, 64 KiB clusters', () => image()],
    ['v2 (compat=0.10)', () => image(['compat=0.10'])],
    ['512-byte clusters', () => image(['cluster_size=512'])],
    ['extended L2', () => image(['extended_l2=on', 'cluster_size=64k'])],
    ['1-bit refcounts', () => image(['refcount_bits=1'])],
    ['64-bit refcounts', () => image(['refcount_bits=64'])],
    [
      'compressed clusters',
      () => {
        const src = image();
        const out = join(dir.path, `img-${n++}.qcow2`);
        runStatus('qemu-img', ['convert', '-c', '-O', 'qcow2', src, out]);
        return out;
      },
    ],
    [
      'internal snapshot and a bitmap',
      () => {
        const p = image();
        runStatus('qemu-img', ['snapshot', '-c', 's1', p]);
        qemuIo(p, ['write -P 0x44 0 64k']);
        runStatus('qemu-img', ['bitmap', '--add', p, 'b0']);
        return p;
      },
    ],
  ];
  it.each(layouts)('%s', async (_name, make) => {
    const p = make();
    const q = qemuCheckJson(p);
    expect(q.status).toBe(0);
    const r = await checkQcow2(p);
    expect({ corruptions: r.corruptions, leaks: r.leaks, messages: r.messages }).toEqual({ corruptions: 0, leaks: 0, messages: [] });
    expect(r.allocatedClusters).toBe(q.json['allocated-clusters'] ?? 0);
    expect(r.imageEndOffset).toBe(q.json['image-end-offset']);
    expect(nbddCheck([p]).status).toBe(0);
  });
});

describe('nbdd check finds damage with qemu-img check categories, and repairs it', () => {
  /** Damage, then: same counts as qemu, repair, qemu clean afterwards, guest bytes unchanged. */
  async function damaged(damage: (p: string) => void, mode: 'leaks' | 'all', expectStatus: number): Promise<string> {
    const p = image();
    const before = qemuRaw(p, dir.path);
    damage(p);
    const q = qemuCheckJson(p);
    const r = await checkQcow2(p);
    expect(r.corruptions).toBe(q.json.corruptions ?? 0);
    expect(r.leaks).toBe(q.json.leaks ?? 0);
    const cli = nbddCheck(['--json', p]);
    expect(cli.status).toBe(expectStatus);
    expect(JSON.parse(cli.stdout)).toMatchObject({ corruptions: r.corruptions, leaks: r.leaks });
    const fixed = await checkQcow2(p, { repair: mode });
    expect({ corruptions: fixed.corruptions, leaks: fixed.leaks }).toEqual({ corruptions: 0, leaks: 0 });
    expect(qemuCheckJson(p).status).toBe(0);
    expect(qemuRaw(p, dir.path).equals(before)).toBe(true);
    return p;
  }

  it('a leaked cluster (exit 3; --repair leaks)', async () => {
    await damaged((p) => {
      // One more cluster at the end of the file, counted but referenced by nothing.
      const end = statSync(p).size;
      truncateSync(p, end + layout(p).cs);
      setRefcount(p, end / layout(p).cs, 1);
    }, 'leaks', 3);
  });

  it('a data cluster with refcount 0 (exit 2; --repair all)', async () => {
    await damaged((p) => setRefcount(p, layout(p).data / layout(p).cs, 0), 'all', 2);
  });

  it('an L2 table with refcount 0', async () => {
    await damaged((p) => setRefcount(p, layout(p).l2 / layout(p).cs, 0), 'all', 2);
  });

  it('a zeroed refcount block (the header counts 0 too)', async () => {
    await damaged((p) => patch(p, layout(p).refblock, Buffer.alloc(layout(p).cs)), 'all', 2);
  });

  it('a refcount of 2 on an exclusive cluster (a leak plus a COPIED error)', async () => {
    await damaged((p) => setRefcount(p, layout(p).data / layout(p).cs, 2), 'all', 2);
  });

  it('--repair leaks leaves corruptions alone (still exit 2), --repair all then fixes them', async () => {
    const p = image();
    const { data, cs } = layout(p);
    const end = statSync(p).size;
    truncateSync(p, end + cs);
    setRefcount(p, data / cs, 0);
    setRefcount(p, end / cs, 1);
    const r = await checkQcow2(p, { repair: 'leaks' });
    expect(r).toMatchObject({ leaksFixed: 1, corruptions: 2, leaks: 0 });
    expect(nbddCheck(['-r', 'all', p]).status).toBe(0);
  });
});

describe('the writable open refuses what the check calls corrupt; repair lets it open', () => {
  it('a data cluster with refcount 0: refused for writing, byte for byte untouched; readable; writable after repair', async () => {
    const p = image();
    const expected = qemuRaw(p, dir.path);
    setRefcount(p, layout(p).data / layout(p).cs, 0);
    const before = readFileSync(p);
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/2 corruption\(s\).*cluster 5 refcount=0 reference=1.*nbdd check --repair all/);
    expect(readFileSync(p).equals(before)).toBe(true);
    const ro = await openQcow2(p, { readOnly: true });
    expect((await ro.read(0, ro.size)).equals(expected)).toBe(true);
    await ro.close();
    await checkQcow2(p, { repair: 'all' });
    const rw = await openQcow2(p, { readOnly: false });
    await rw.write(MiB, Buffer.alloc(65536, 0x55));
    await rw.close();
    expected.fill(0x55, MiB, MiB + 65536);
    expect(qemuRaw(p, dir.path).equals(expected)).toBe(true);
    expect(qemuCheckJson(p).status).toBe(0);
  });

  it('a dirty lazy-refcounts image (qemu-io killed): nbdd check finds its stale counts; --repair all fixes them and clears the dirty bit', async () => {
    const p = image(['lazy_refcounts=on']);
    const expected = qemuRaw(p, dir.path);
    runStatus('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x66 2M 128k', '-c', 'abort', p]);
    expected.fill(0x66, 2 * MiB, 2 * MiB + 128 * 1024);
    expect(decodeHeader(readFileSync(p).subarray(0, 4096)).incompatibleFeatures & 1n).toBe(1n);
    expect((await checkQcow2(p)).corruptions).toBeGreaterThan(0); // lazy refcounts: counts behind the references
    const r = await checkQcow2(p, { repair: 'all' });
    expect(r.cleared).toEqual(['dirty']);
    expect(r.corruptions).toBe(0);
    expect(decodeHeader(readFileSync(p).subarray(0, 4096)).incompatibleFeatures & 1n).toBe(0n);
    const rw = await openQcow2(p, { readOnly: false });
    await rw.close();
    expect(qemuRaw(p, dir.path).equals(expected)).toBe(true);
    expect(qemuCheckJson(p).status).toBe(0);
  });

  it('the corrupt bit on a consistent image: --repair all clears it', async () => {
    const p = image();
    const h = decodeHeader(readFileSync(p).subarray(0, 4096));
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(h.incompatibleFeatures | 2n);
    patch(p, 72, b);
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/marked corrupt/);
    expect((await checkQcow2(p, { repair: 'all' })).cleared).toEqual(['corrupt']);
    await (await openQcow2(p, { readOnly: false })).close();
  });

  it('an L1 entry pointing at a data cluster: refused for writing, reads fail with EIO-class errors, never zeroes', async () => {
    const p = image();
    const { l1, data } = layout(p);
    patch(p, l1, u64(0x8000000000000000n | BigInt(data)));
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/corruption/);
    const ro = await openQcow2(p, { readOnly: true });
    const err = await ro.read(0, 65536).then(
      () => null,
      (e: unknown) => e,
    );
    await ro.close();
    expect(err).toBeInstanceOf(NbddError);
    expect((err as NbddError).message).toMatch(/reserved bits/);
    // Leaked clusters may be the data the damaged entry lost: a repair keeps them.
    const r = await checkQcow2(p, { repair: 'all' });
    expect(r.leaksFixed).toBe(0);
    expect(r.corruptions).toBeGreaterThan(0);
  });

  it('a daemon killed mid-write leaks only: nbdd check -r leaks reclaims it, and qemu-img check agrees', async () => {
    const p = image();
    const child = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `import { openQcow2 } from ${JSON.stringify(new URL('../../dist/backends/qcow2/open.js', import.meta.url).href)};
         const img = await openQcow2(process.argv[1], { readOnly: false });
         for (let i = 0; i < 32; i++) await img.write(i * 131072 + 4096, Buffer.alloc(8192, i + 1));
         await img.flush();
         process.stdout.write('READY\\n');
         setInterval(() => {}, 1000);`,
        p,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    await new Promise<void>((resolve) => child.stdout.on('data', (d: Buffer) => d.toString().includes('READY') && resolve()));
    child.kill('SIGKILL');
    await new Promise((resolve) => child.on('exit', resolve));
    const expected = qemuRaw(p, dir.path);
    const q = qemuCheckJson(p);
    expect(q.status).toBe(3);
    const r = await checkQcow2(p);
    expect({ corruptions: r.corruptions, leaks: r.leaks }).toEqual({ corruptions: 0, leaks: q.json.leaks });
    const copy = join(dir.path, `img-${n++}.qcow2`);
    copyFileSync(p, copy);
    expect(nbddCheck(['--repair', 'leaks', copy]).status).toBe(0);
    expect(qemuCheckJson(copy).status).toBe(0);
    expect(qemuRaw(copy, dir.path).equals(expected)).toBe(true);
  });
});

describe('overlap check', () => {
  it('a write whose L2 entry names the L1 table fails with EIO, writes nothing there, and marks the image corrupt', async () => {
    const p = image();
    const { l1, l2 } = layout(p);
    const img = await openQcow2(p, { readOnly: false });
    // Damage after the open-time check, as a bug or another writer would: guest 0 now maps onto L1.
    patch(p, l2, u64(0x8000000000000000n | BigInt(l1)));
    const l1Before = readFileSync(p).subarray(l1, l1 + 4096);
    const err = await img.write(0, Buffer.alloc(4096, 0x77)).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbddError);
    expect((err as NbddError).message).toMatch(/overlap check failed.*marked corrupt/);
    await expect(img.write(6 * MiB, Buffer.alloc(4096))).rejects.toThrow(/overlap check failed/);
    await expect(img.close()).rejects.toThrow(/overlap check failed/); // its last commit is refused too
    const file = readFileSync(p);
    expect(file.subarray(l1, l1 + 4096).equals(l1Before)).toBe(true);
    expect(decodeHeader(file.subarray(0, 4096)).incompatibleFeatures & 2n).toBe(2n);
  });
});
