#!/usr/bin/env node
/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`, e.g. BENCH_PROFILE=1 of kernel-nbd.mjs):
 * the functions with the most self time, and the most total (inclusive) time, as percentages of
 * the samples. `node bench/profile-top.mjs FILE [--rows N] [--marks FILE --job NAME]`: N rows
 * (default 30); with a marks file (lines "NAME START_SECONDS" on CLOCK_MONOTONIC, as
 * bench/kernel-nbd.mjs writes them), only the samples between the job's mark and the next one.
 */
import { readFileSync } from 'node:fs';

import { parseArgs } from 'node:util';

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: { rows: { type: 'string', default: '30' }, marks: { type: 'string' }, job: { type: 'string' } },
});
const file = positionals[0];
if (!file || (opts.job && !opts.marks)) {
  process.stderr.write('usage: node bench/profile-top.mjs FILE.cpuprofile [--rows N] [--marks FILE --job NAME]\n');
  process.exit(2);
}
const rows = Number(opts.rows);
const prof = JSON.parse(readFileSync(file, 'utf8'));

/** The job's window in µs of the profile's clock, or the whole profile. */
let from = -Infinity;
let to = Infinity;
if (opts.job) {
  const marks = readFileSync(opts.marks, 'utf8').trim().split('\n').map((l) => l.split(' '));
  const i = marks.findIndex(([name]) => name === opts.job);
  if (i < 0) throw new Error(`no mark for job ${opts.job} in ${opts.marks}`);
  from = Number(marks[i][1]) * 1e6;
  to = i + 1 < marks.length ? Number(marks[i + 1][1]) * 1e6 : Infinity;
}
// Sample i was taken at startTime + timeDeltas[0..i].
const samples = [];
for (let i = 0, t = prof.startTime; i < prof.samples.length; i++) {
  t += prof.timeDeltas[i];
  if (t >= from && t < to) samples.push(prof.samples[i]);
}

const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const parent = new Map();
for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

/** Sample counts per node id. */
const hits = new Map();
for (const id of samples) hits.set(id, (hits.get(id) ?? 0) + 1);
const total = samples.length;
const seconds = Number.isFinite(to) && Number.isFinite(from) ? (to - from) / 1e6 : (prof.endTime - prof.startTime) / 1e6;

const label = (n) => {
  const f = n.callFrame;
  const where = f.url ? `${f.url.replace(/^.*\/(src|dist|node_modules)\//, '$1/').replace(/^node:/, 'node:')}:${f.lineNumber + 1}` : '';
  return `${f.functionName || '(anonymous)'} ${where}`.trim();
};

const self = new Map();
const inclusive = new Map();
for (const [id, count] of hits) {
  const name = label(byId.get(id));
  self.set(name, (self.get(name) ?? 0) + count);
  // Each function counted once per sample even when recursive.
  const seen = new Set();
  for (let at = id; at !== undefined; at = parent.get(at)) {
    const l = label(byId.get(at));
    if (seen.has(l)) continue;
    seen.add(l);
    inclusive.set(l, (inclusive.get(l) ?? 0) + count);
  }
}

const print = (title, map) => {
  process.stdout.write(`${title} (${total} samples, ${seconds.toFixed(1)} s)\n`);
  for (const [name, count] of [...map].sort((a, b) => b[1] - a[1]).slice(0, rows)) {
    if (process.stdout.writableEnded) return;
    process.stdout.write(`${((100 * count) / total).toFixed(1).padStart(6)}%  ${name}\n`);
  }
};
print('self time', self);
process.stdout.write('\n');
print('total time', inclusive);
