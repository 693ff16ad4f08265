/**
 * Crash safety: a child process writes through the qcow2 backend and is killed with SIGKILL at
 * random moments, many times over the same image. After each kill `qemu-img check` must report
 * no corruption (exit 0, or 3 for leaked clusters only), and every write acknowledged before a
 * completed flush must be there; bytes touched by later, unflushed requests may hold either
 * value.
 */
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prng, qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tools.js';
// @ts-expect-error: plain ESM helper shared with the child process
import { crashBatches } from '../helpers/qcow2-crash-ops.mjs';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const CLUSTER = 64 * KiB;
const CHILD = resolve(import.meta.dirname, '../helpers/qcow2-crash-child.mjs');
const ROUNDS = 24;

interface Op {
  kind: 'write' | 'zero' | 'discard';
  off: number;
  len: number;
  pattern: number;
}

let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-crash-');
});
afterAll(() => dir.remove());

/** The bytes an op leaves; discards zero whole clusters only (v3 over a backing file). */
function apply(model: Buffer, op: Op): void {
  if (op.kind === 'write') model.fill(op.pattern, op.off, op.off + op.len);
  else if (op.kind === 'zero') model.fill(0, op.off, op.off + op.len);
  else {
    const first = Math.ceil(op.off / CLUSTER) * CLUSTER;
    const last = Math.floor((op.off + op.len) / CLUSTER) * CLUSTER;
    if (last > first) model.fill(0, first, last);
  }
}

/** Runs the child, kills it with SIGKILL after `ms`, returns the number of flushed batches. */
function runAndKill(image: string, seed: number, ms: number): Promise<number> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [CHILD, image, String(seed), String(SIZE), String(CLUSTER)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.on('data', (d: Buffer) => {
      out += d;
      if (!timer && out.includes('READY')) timer = setTimeout(() => child.kill('SIGKILL'), ms);
    });
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.on('exit', (code, signal) => {
      if (signal !== 'SIGKILL') return reject(new Error(`child exited ${code} before the kill: ${err}`));
      const flushed = [...out.matchAll(/^F (\d+)$/gm)].map((m) => Number(m[1]));
      resolveRun(flushed.length ? flushed[flushed.length - 1]! : 0);
    });
  });
}

describe('qcow2 crash safety (SIGKILL)', () => {
  it(`keeps the image consistent and flushed writes durable over ${ROUNDS} kills`, async () => {
    const base = join(dir.path, 'base.qcow2');
    const image = join(dir.path, 'crash.qcow2');
    qemuCreate(base, SIZE);
    qemuIo(base, [`write -P 0x7e 0 ${SIZE}`]);
    qemuCreate(image, SIZE, [], { path: base, format: 'qcow2' });
    let content = qemuRaw(image, dir.path);
    const rnd = prng(42);
    let totalFlushed = 0;
    let leakRounds = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const seed = 1000 + round;
      const flushed = await runAndKill(image, seed, 30 + Math.floor(rnd() * 400));
      totalFlushed += flushed;
      const check = qemuCheck(image);
      expect([0, 3], `round ${round}: qemu-img check exited ${check.status}\n${check.output}`).toContain(check.status);
      if (check.status === 3) leakRounds++;

      const batches = crashBatches(seed, flushed + 1, SIZE, CLUSTER) as Op[][];
      const model = Buffer.from(content);
      for (const batch of batches.slice(0, flushed)) for (const op of batch) apply(model, op);
      const pending = batches[flushed]!;
      const actual = qemuRaw(image, dir.path);
      // Each differing byte must be explained by a request of the unflushed batch.
      for (let i = 0; i < SIZE; i++) {
        if (actual[i] === model[i]) continue;
        const explained = pending.some((op) => {
          if (i < op.off || i >= op.off + op.len) return false;
          if (op.kind === 'write') return actual[i] === op.pattern;
          return actual[i] === 0;
        });
        if (!explained) throw new Error(`round ${round}: byte ${i} is ${actual[i]}, flushed state says ${model[i]}`);
      }
      content = actual;
    }
    expect(totalFlushed).toBeGreaterThan(ROUNDS);
    console.log(`crash test: ${ROUNDS} kills, ${totalFlushed} flushed batches, ${leakRounds} rounds with leaks`);
  }, 180_000); // ~25 s on an idle machine; generous for a shared one
});
