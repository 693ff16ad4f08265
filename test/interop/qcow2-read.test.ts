/**
 * Images made by qemu-img / qemu-io in every variant nbdd supports, read through the qcow2
 * backend and compared byte for byte with `qemu-img convert -O raw`; block status compared with
 * `qemu-img map` (allocation depth and data/hole).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { FilePort } from '../../src/io/file-port.js';
import type { Extent } from '../../src/core/backend.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { prng, qemuCreate, qemuIo, qemuMap, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { run, tempDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-read-');
});
afterAll(() => dir.remove());

/** qemu-io commands writing patterns, zeroes and discards at scattered, unaligned offsets. */
function scatteredWrites(size: number, seed: number, count = 40): string[] {
  const rnd = prng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = 512 * (1 + Math.floor(rnd() * 300));
    const off = 512 * Math.floor(rnd() * ((size - len) / 512));
    const pick = rnd();
    if (pick < 0.7) cmds.push(`write -P 0x${(1 + Math.floor(rnd() * 254)).toString(16)} ${off} ${len}`);
    else if (pick < 0.85) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`discard ${off} ${len}`);
  }
  return cmds;
}

/** Reads the whole image through nbdd in randomly sized chunks (crossing cluster boundaries). */
async function readAll(path: string, seed: number): Promise<Buffer> {
  const img = await openQcow2(path, { readOnly: true });
  try {
    const out = Buffer.alloc(img.size);
    const rnd = prng(seed);
    const reads: Promise<void>[] = [];
    for (let pos = 0; pos < img.size; ) {
      const n = Math.min(img.size - pos, 1 + Math.floor(rnd() * 300 * KiB));
      const at = pos;
      reads.push(img.read(at, n).then((b) => void b.copy(out, at)));
      pos += n;
    }
    await Promise.all(reads);
    return out;
  } finally {
    await img.close();
  }
}

async function allStatus(path: string): Promise<Extent[]> {
  const img = await openQcow2(path, { readOnly: true });
  try {
    const out: Extent[] = [];
    for (let pos = 0; pos < img.size; ) {
      const exts = await img.blockStatus(pos, img.size - pos);
      expect(exts.length).toBeGreaterThan(0);
      for (const e of exts) {
        out.push(e);
        pos += e.length;
      }
    }
    return out;
  } finally {
    await img.close();
  }
}

/** Per-512-byte-sector (depth, hole) from our extents and from qemu-img map, for comparison. */
function sectorsOf(extents: { length: number; depth?: number; hole: boolean }[]): string {
  const parts: string[] = [];
  let last = '';
  let run = 0;
  for (const e of extents) {
    const key = `${e.depth}${e.hole ? 'h' : 'd'}`;
    if (key === last) run += e.length;
    else {
      if (run) parts.push(`${last}:${run}`);
      last = key;
      run = e.length;
    }
  }
  parts.push(`${last}:${run}`);
  return parts.join(' ');
}

function qemuSectors(path: string): string {
  return sectorsOf(qemuMap(path).map((m) => ({ length: m.length, depth: m.present ? m.depth + 1 : 0, hole: !m.data })));
}

const variants: { name: string; size: number; opts: string[] }[] = [
  { name: 'v2 (compat=0.10)', size: 8 * MiB, opts: ['compat=0.10'] },
  { name: 'v3 (compat=1.1)', size: 8 * MiB, opts: ['compat=1.1'] },
  { name: '512 B clusters', size: 4 * MiB, opts: ['cluster_size=512'] },
  { name: '2 MiB clusters', size: 12 * MiB, opts: ['cluster_size=2097152'] },
  { name: 'refcount_bits=1', size: 8 * MiB, opts: ['refcount_bits=1'] },
  { name: 'refcount_bits=64', size: 8 * MiB, opts: ['refcount_bits=64'] },
  { name: 'extended_l2', size: 8 * MiB, opts: ['extended_l2=on'] },
  { name: 'lazy_refcounts', size: 8 * MiB, opts: ['lazy_refcounts=on'] },
];

describe('qcow2 reads match qemu-img convert', () => {
  variants.forEach((v, i) => {
    it(v.name, async () => {
      const path = join(dir.path, `v${i}.qcow2`);
      qemuCreate(path, v.size, v.opts);
      qemuIo(path, scatteredWrites(v.size, 100 + i));
      const expected = qemuRaw(path, dir.path);
      expect((await readAll(path, i)).equals(expected)).toBe(true);
      expect(sectorsOf(await allStatus(path))).toBe(qemuSectors(path));
    });
  });

  for (const type of ['zlib', 'zstd']) {
    it(`compressed clusters (${type})`, async () => {
      const src = join(dir.path, `c-${type}-src.qcow2`);
      const path = join(dir.path, `c-${type}.qcow2`);
      qemuCreate(src, 6 * MiB);
      qemuIo(src, scatteredWrites(6 * MiB, 7));
      run('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${type}`, src, path]);
      expect(run('qemu-img', ['info', path])).toContain(`compression type: ${type}`);
      const expected = qemuRaw(src, dir.path);
      expect((await readAll(path, 3)).equals(expected)).toBe(true);
      expect(sectorsOf(await allStatus(path))).toBe(qemuSectors(path));
    });
  }

  it('three-level chain qcow2 -> qcow2 -> raw, relative backing names', async () => {
    const size = 6 * MiB;
    const base = Buffer.alloc(size);
    const rnd = prng(5);
    for (let i = 0; i < size; i++) base[i] = (rnd() * 256) | 0;
    writeFileSync(join(dir.path, 'base.raw'), base);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir.path, 'mid.qcow2')]);
    qemuIo(join(dir.path, 'mid.qcow2'), scatteredWrites(size, 11, 20));
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'mid.qcow2', '-F', 'qcow2', join(dir.path, 'top.qcow2'), `${8 * MiB}`]);
    qemuIo(join(dir.path, 'top.qcow2'), scatteredWrites(8 * MiB, 12, 20));
    const top = join(dir.path, 'top.qcow2');
    const expected = qemuRaw(top, dir.path);
    // Turn the top image's backing format extension into an unknown one: nbdd must probe.
    const file = readFileSync(top);
    const at = file.subarray(0, 65536).indexOf(Buffer.from('e2792aca', 'hex'));
    expect(at).toBeGreaterThan(0);
    Buffer.from('7e57e57e', 'hex').copy(file, at);
    writeFileSync(top, file);
    const probed = await openQcow2(top, { readOnly: true });
    expect(probed.extensions.backingFormat).toBeUndefined();
    expect(probed.extensions.unknownTypes).toEqual([0x7e57e57e]);
    expect(probed.backing?.format).toBe('qcow2');
    expect(probed.backing?.backing?.format).toBe('raw');
    await probed.close();
    expect((await readAll(top, 9)).equals(expected)).toBe(true);
    expect(sectorsOf(await allStatus(top))).toBe(qemuSectors(top));
  });

  it('reads contiguous allocated clusters with one file read', async () => {
    const path = join(dir.path, 'contiguous.qcow2');
    qemuCreate(path, 8 * MiB);
    qemuIo(path, [`write -P 0x3c 0 ${8 * MiB}`]);
    const img = await openQcow2(path, { readOnly: true });
    try {
      await img.read(0, 512); // loads the L2 table
      // The port is whichever I/O engine is in use (io_uring or node:fs); watch that object's reads.
      const port = (img as unknown as { st: { port: Pick<FilePort, 'readAt'> } }).st.port;
      const spy = vi.spyOn(port, 'readAt');
      const data = await img.read(4096, 4 * MiB + 1000); // 65 clusters, unaligned at both ends
      expect(spy).toHaveBeenCalledTimes(1);
      spy.mockRestore();
      expect(data.every((b) => b === 0x3c)).toBe(true);
    } finally {
      await img.close();
    }
  });
});
