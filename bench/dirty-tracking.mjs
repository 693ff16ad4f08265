#!/usr/bin/env node
/**
 * Cost of dirty tracking with write-intent persistence, in-process (no network): the same
 * request mix through the same layer stack (stats → dirty tracking → copy-before-write → raw
 * backend on a file), once with no bitmap ("off") and once with one enabled persistent 64 KiB
 * bitmap in a sidecar file ("on"). Prints ops/s and MiB/s per case and the ratio on/off.
 *
 * Cases
 * - 4k-rand-first: 4 KiB writes at random 4 KiB offsets of a 4 GiB sparse file, bitmap clean at
 *   the start: nearly every batch dirties new granules (one bitmap write + one fdatasync per batch).
 * - 4k-rand-steady: the same, with every granule already dirty (the common case after warm-up).
 * - 1m-seq-first: 1 MiB sequential writes over the first 1 GiB, bitmap clean at the start.
 * Queue depth 32 (32 requests per event-loop turn, as a busy frontend submits them). Writes are
 * buffered (page cache); neither side flushes data, so the bitmap's fdatasync is all the
 * persistence costs. Best of BENCH_ROUNDS (3) rounds per cell, cells alternate off/on.
 *
 * Needs `npm run build` first (imports dist/). BENCH_DIR sets where the files go (OS temp dir),
 * BENCH_CASES a regular expression on case names (all).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RawBackend } from '../dist/backends/raw.js';
import { BitmapSet } from '../dist/bitmaps/bitmap-set.js';
import { SidecarFileStore } from '../dist/bitmaps/store-sidecar-file.js';
import { buildStack } from '../dist/runtime/stack.js';

const MiB = 1024 * 1024;
const SIZE = 4096 * MiB;
const QD = 32;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'nbdd-bench-bm-'));

let seed = 12345;
const rand = (n) => {
  seed = (seed * 1103515245 + 12345) >>> 0;
  return seed % n;
};

const CASES = [
  { name: '4k-rand-first', ops: 20000, size: 4096, offset: () => rand(SIZE / 4096) * 4096, prefill: false },
  { name: '4k-rand-steady', ops: 40000, size: 4096, offset: () => rand(SIZE / 4096) * 4096, prefill: true },
  { name: '1m-seq-first', ops: 1024, size: MiB, offset: (i) => i * MiB, prefill: false },
];

async function cell(c, tracking, round) {
  const img = join(dir, `img-${c.name}-${tracking}-${round}`);
  const raw = await RawBackend.open(img, { create: SIZE });
  const store = tracking ? await SidecarFileStore.open(`${img}.bitmaps`, SIZE) : null;
  const bitmaps = await BitmapSet.open(SIZE, store);
  if (tracking) await bitmaps.add('b0', { granularity: 65536 });
  if (tracking && c.prefill) await bitmaps.mark(0, SIZE);
  const queue = buildStack(raw, bitmaps).queue;
  const data = Buffer.alloc(c.size, 0x5a);
  seed = 777 + round;
  const t0 = performance.now();
  for (let i = 0; i < c.ops; i += QD) {
    const batch = [];
    for (let j = i; j < Math.min(c.ops, i + QD); j++) batch.push(queue.write(c.offset(j), data));
    await Promise.all(batch);
  }
  const seconds = (performance.now() - t0) / 1000;
  await queue.close();
  rmSync(img, { force: true });
  rmSync(`${img}.bitmaps`, { force: true });
  return { iops: c.ops / seconds, mibs: (c.ops * c.size) / MiB / seconds };
}

const only = process.env.BENCH_CASES ? new RegExp(process.env.BENCH_CASES) : null;
const rows = [];
for (const c of CASES.filter((x) => !only || only.test(x.name))) {
  const best = { off: null, on: null };
  for (let round = 0; round < ROUNDS; round++) {
    for (const tracking of [false, true]) {
      const r = await cell(c, tracking, round);
      const k = tracking ? 'on' : 'off';
      if (!best[k] || r.iops > best[k].iops) best[k] = r;
    }
  }
  rows.push({ case: c.name, off: best.off, on: best.on, ratio: best.on.iops / best.off.iops });
  process.stderr.write(`${c.name} done\n`);
}
rmSync(dir, { recursive: true, force: true });
if (process.argv.includes('--json')) process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
else {
  process.stdout.write('case              off ops/s   off MiB/s   on ops/s    on MiB/s   on/off   overhead\n');
  for (const r of rows) {
    const f = (n, w) => n.toFixed(0).padStart(w);
    process.stdout.write(`${r.case.padEnd(16)} ${f(r.off.iops, 10)} ${f(r.off.mibs, 10)} ${f(r.on.iops, 10)} ${f(r.on.mibs, 10)}   ${r.ratio.toFixed(3)}   ${((1 - r.ratio) * 100).toFixed(1)} %\n`);
  }
}
