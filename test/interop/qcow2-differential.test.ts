/**
 * Differential test: one seeded random sequence of writes, zero writes, discards, flushes and
 * reads is applied to two copies of an image, one through qemu-io (all commands in one process)
 * and one through the nbdd qcow2 backend with many requests in flight at once (overlapping ones
 * included: the backend serializes requests on the same cluster in arrival order). Then
 * `qemu-img compare` must find the copies equal and `qemu-img check` must find nbdd's copy clean
 * (no errors, no leaks). Reads are checked against a model of the expected contents.
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import type { Qcow2Image } from '../../src/backends/qcow2/image.js';
import { prng, qemuCheck, qemuCompare, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { run, tempDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-diff-');
});
afterAll(() => dir.remove());

type Op =
  | { kind: 'write'; off: number; len: number; pattern: number }
  | { kind: 'zero'; off: number; len: number; unmap: boolean }
  | { kind: 'discard'; off: number; len: number }
  | { kind: 'read'; off: number; len: number }
  | { kind: 'flush' };

function randomOps(seed: number, count: number, size: number, cluster: number): Op[] {
  const rnd = prng(seed);
  const ops: Op[] = [];
  // Keep operations in a few hot areas so they overlap often.
  const hot = [0, Math.floor(size / 3), size - 4 * cluster].map((x) => Math.max(0, Math.floor(x / cluster) * cluster));
  for (let i = 0; i < count; i++) {
    const aligned = rnd() < 0.4;
    const maxLen = rnd() < 0.2 ? 6 * cluster : Math.max(cluster, 8 * KiB);
    let len = aligned ? cluster * (1 + Math.floor((rnd() * maxLen) / cluster)) : 1 + Math.floor(rnd() * maxLen);
    const base = rnd() < 0.5 ? hot[Math.floor(rnd() * hot.length)]! : 0;
    const span = rnd() < 0.5 ? 8 * cluster : size;
    let off = base + Math.floor(rnd() * span);
    if (aligned) off = Math.floor(off / cluster) * cluster;
    off = Math.min(off, size - 1);
    len = Math.min(len, size - off);
    const pick = rnd();
    if (pick < 0.5) ops.push({ kind: 'write', off, len, pattern: 1 + Math.floor(rnd() * 255) });
    else if (pick < 0.62) ops.push({ kind: 'zero', off, len, unmap: rnd() < 0.5 });
    else if (pick < 0.74) ops.push({ kind: 'discard', off, len });
    else if (pick < 0.94) ops.push({ kind: 'read', off, len });
    else ops.push({ kind: 'flush' });
  }
  return ops;
}

function qemuCommand(op: Op): string | null {
  switch (op.kind) {
    case 'write':
      return `write -P 0x${op.pattern.toString(16)} ${op.off} ${op.len}`;
    case 'zero':
      return `write -z ${op.unmap ? '-u ' : ''}${op.off} ${op.len}`;
    case 'discard':
      return `discard ${op.off} ${op.len}`;
    case 'flush':
      return 'flush';
    case 'read':
      return null;
  }
}

/** What a discard does to the contents, as QEMU 7.2 implements it (whole clusters only). */
function applyToModel(model: Buffer, op: Op, cluster: number, discardZeroes: boolean): void {
  if (op.kind === 'write') model.fill(op.pattern, op.off, op.off + op.len);
  else if (op.kind === 'zero') model.fill(0, op.off, op.off + op.len);
  else if (op.kind === 'discard' && discardZeroes) {
    const first = Math.ceil(op.off / cluster) * cluster;
    let last = Math.floor((op.off + op.len) / cluster) * cluster;
    if (op.off + op.len === model.length) last = model.length;
    if (last > first) model.fill(0, first, last);
  }
}

/** Applies `ops` through nbdd, `batch` requests in flight at a time; checks reads against the model. */
async function applyNbdd(img: Qcow2Image, ops: Op[], model: Buffer, cluster: number, discardZeroes: boolean, batch: number): Promise<number> {
  let inFlight: Promise<void>[] = [];
  let checkedReads = 0;
  for (const op of ops) {
    if (op.kind === 'flush') {
      await Promise.all(inFlight);
      inFlight = [];
      await img.flush();
      continue;
    }
    if (op.kind === 'read') {
      const expected = Buffer.from(model.subarray(op.off, op.off + op.len));
      inFlight.push(
        img.read(op.off, op.len).then((got) => {
          if (!got.equals(expected)) throw new Error(`read ${op.off}+${op.len} differs from the model`);
          checkedReads++;
        }),
      );
    } else if (op.kind === 'write') {
      inFlight.push(img.write(op.off, Buffer.alloc(op.len, op.pattern)));
    } else if (op.kind === 'zero') {
      inFlight.push(img.writeZeroes(op.off, op.len, { noHole: !op.unmap }));
    } else {
      inFlight.push(img.trim(op.off, op.len));
    }
    applyToModel(model, op, cluster, discardZeroes);
    if (inFlight.length >= batch) {
      await Promise.all(inFlight);
      inFlight = [];
    }
  }
  await Promise.all(inFlight);
  return checkedReads;
}

interface Variant {
  name: string;
  size: number;
  cluster: number;
  opts: string[];
  backing?: boolean;
  compressed?: boolean;
  /** L2 cache budget in bytes (default: the backend's). */
  l2CacheBytes?: number;
}

const variants: Variant[] = [
  { name: 'v3 over a qcow2 backing file (COW)', size: 8 * MiB, cluster: 64 * KiB, opts: [], backing: true },
  { name: 'v2, no backing file', size: 8 * MiB, cluster: 64 * KiB, opts: ['compat=0.10'] },
  { name: 'v2 over a backing file', size: 8 * MiB, cluster: 64 * KiB, opts: ['compat=0.10'], backing: true },
  { name: 'extended L2 over a backing file', size: 8 * MiB, cluster: 64 * KiB, opts: ['extended_l2=on'], backing: true },
  { name: '512 B clusters, 64-bit refcounts (refcount table growth)', size: 4 * MiB, cluster: 512, opts: ['cluster_size=512', 'refcount_bits=64'] },
  { name: 'writes over compressed clusters', size: 8 * MiB, cluster: 64 * KiB, opts: [], compressed: true },
  // 128 tables through 4: nearly every request loads a table into an evicted one's buffer.
  { name: '512 B clusters through a 4-table L2 cache (evictions, reused table buffers)', size: 4 * MiB, cluster: 512, opts: ['cluster_size=512'], backing: true, l2CacheBytes: 4 * 512 },
];

describe('qcow2 writes: differential against qemu-io', () => {
  variants.forEach((v, vi) => {
    it(v.name, async () => {
      const start = join(dir.path, `start-${vi}.qcow2`);
      if (v.backing) {
        const base = join(dir.path, `base-${vi}.qcow2`);
        qemuCreate(base, v.size, []);
        qemuIo(base, [`write -P 0x5c 0 ${v.size}`, `write -z ${v.size / 2} ${v.cluster * 3}`]);
        qemuCreate(start, v.size, v.opts, { path: base, format: 'qcow2' });
      } else {
        qemuCreate(start, v.size, v.opts);
      }
      const seedWrites = [`write -P 0x33 ${v.cluster} ${v.cluster * 4}`, `write -P 0x44 ${v.size - 3 * v.cluster} ${v.cluster * 2 + 100}`];
      qemuIo(start, seedWrites);
      if (v.compressed) {
        const plain = join(dir.path, `plain-${vi}.qcow2`);
        copyFileSync(start, plain);
        run('qemu-img', ['convert', '-c', '-O', 'qcow2', plain, start]);
      }
      const discardZeroes = !(v.opts.includes('compat=0.10') && v.backing);
      let totalOps = 0;
      for (const seed of [1, 2]) {
        const ops = randomOps(seed * 1000 + vi, 350, v.size, v.cluster);
        totalOps += ops.length;
        const ours = join(dir.path, `ours-${vi}-${seed}.qcow2`);
        const theirs = join(dir.path, `theirs-${vi}-${seed}.qcow2`);
        copyFileSync(start, ours);
        copyFileSync(start, theirs);
        qemuIo(theirs, ops.map(qemuCommand).filter((c): c is string => c !== null));
        const model = qemuRaw(start, dir.path);
        const img = await openQcow2(ours, { readOnly: false, l2CacheBytes: v.l2CacheBytes });
        let reads: number;
        try {
          reads = await applyNbdd(img, ops, model, v.cluster, discardZeroes, 16 + seed * 8);
          // Every request gave back the L2 tables it took (a leak would hold them past the cache).
          expect(img.pinnedL2Tables).toBe(0);
        } finally {
          await img.close();
        }
        expect(reads).toBeGreaterThan(0);
        const cmp = qemuCompare(ours, theirs);
        expect(cmp.output).toContain('Images are identical');
        expect(cmp.status).toBe(0);
        const check = qemuCheck(ours);
        expect(check.output).toContain('No errors were found');
        expect(check.output).not.toMatch(/leaked/);
        expect(check.status).toBe(0);
        expect(qemuRaw(ours, dir.path).equals(model)).toBe(true);
      }
      expect(totalOps).toBe(700);
    });
  });
});
