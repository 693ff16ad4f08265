/**
 * Crash safety: a child process writes through the qcow2 backend and is killed with SIGKILL at
 * random moments, many times over the same image. After each kill `qemu-img check` must report
 * no corruption (exit 0, or 3 for leaked clusters only), every write acknowledged before a
 * completed flush must be there, and so must every write or zero write acknowledged at all: the
 * process died, not the machine, so the page cache kept what the daemon wrote before replying
 * (what lets `nbdd attach` take over a device with nothing lost). Bytes touched by requests of
 * the unfinished batch may hold any of their values, since those ran concurrently.
 */
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prng, qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tools.js';
// @ts-expect-error: plain ESM helper shared with the child process
import { applyOp, crashBatches, explainedBy } from '../helpers/qcow2-crash-ops.mjs';

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

/**
 * Runs the child, kills it with SIGKILL after `ms`; returns the number of flushed batches and
 * which ops of the batch after them were acknowledged.
 */
function runAndKill(image: string, seed: number, ms: number): Promise<{ flushed: number; acked: Set<number> }> {
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
      const marks = [...out.matchAll(/^F (\d+)$/gm)].map((m) => Number(m[1]));
      const flushed = marks.length ? marks[marks.length - 1]! : 0;
      const acked = new Set([...out.matchAll(/^A (\d+) (\d+)$/gm)].filter((m) => Number(m[1]) === flushed).map((m) => Number(m[2])));
      resolveRun({ flushed, acked });
    });
  });
}

describe('qcow2 crash safety (SIGKILL)', () => {
  it(`keeps the image consistent and acknowledged writes durable over ${ROUNDS} kills`, async () => {
    const base = join(dir.path, 'base.qcow2');
    const image = join(dir.path, 'crash.qcow2');
    qemuCreate(base, SIZE);
    qemuIo(base, [`write -P 0x7e 0 ${SIZE}`]);
    qemuCreate(image, SIZE, [], { path: base, format: 'qcow2' });
    let content = qemuRaw(image, dir.path);
    const rnd = prng(42);
    let totalFlushed = 0;
    let leakRounds = 0;
    let totalAcked = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const seed = 1000 + round;
      const { flushed, acked } = await runAndKill(image, seed, 30 + Math.floor(rnd() * 400));
      totalFlushed += flushed;
      totalAcked += acked.size;
      const check = qemuCheck(image);
      expect([0, 3], `round ${round}: qemu-img check exited ${check.status}\n${check.output}`).toContain(check.status);
      if (check.status === 3) leakRounds++;

      const batches = crashBatches(seed, flushed + 1, SIZE, CLUSTER) as Op[][];
      const model = Buffer.from(content);
      for (const batch of batches.slice(0, flushed)) for (const op of batch) applyOp(model, op, CLUSTER);
      const pending = batches[flushed]!;
      const actual = qemuRaw(image, dir.path);
      const covers = (op: Op, i: number): boolean => i >= op.off && i < op.off + op.len;
      const explained = (i: number): boolean => explainedBy(pending, i, actual[i]) as boolean;
      // Discards only promise whole clusters: they are not counted among the acknowledged ops.
      const mustChange = pending.filter((op, k) => acked.has(k) && op.kind !== 'discard');
      for (let i = 0; i < SIZE; i++) {
        // A byte differing from the flushed state must come from a request of the unflushed batch;
        if (actual[i] !== model[i] && !explained(i)) throw new Error(`round ${round}: byte ${i} is ${actual[i]}, flushed state says ${model[i]}`);
        // one under an acknowledged request must hold the value of one of the batch's requests.
        if (actual[i] === model[i] && !explained(i) && mustChange.some((op) => covers(op, i))) {
          throw new Error(`round ${round}: byte ${i} is still ${actual[i]} although a request writing it was acknowledged before the kill`);
        }
      }
      content = actual;
    }
    expect(totalFlushed).toBeGreaterThan(ROUNDS);
    expect(totalAcked).toBeGreaterThan(0);
    console.log(`crash test: ${ROUNDS} kills, ${totalFlushed} flushed batches, ${totalAcked} acknowledged unflushed requests checked, ${leakRounds} rounds with leaks`);
  }, 180_000); // ~25 s on an idle machine; generous for a shared one
});
