/**
 * Power-loss safety of the qcow2 write path (docs/qcow2.md, "Crash-safe ordering"): batches of
 * concurrent writes, zero writes and discards, each followed by a flush, go through a recording
 * file port. At many random moments the test then builds the file a power loss could have left —
 * what the last returned fdatasync made durable, plus a random subset of the changes after it —
 * and checks it as QEMU would: `qemu-img check` finds no corruption (leaked clusters are allowed),
 * every batch whose flush returned is there, and nbdd opens the file and reads what qemu reads.
 * The SIGKILL test (qcow2-crash) covers a killed process, where nothing written is lost.
 */
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { prng, qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { RecordingPort } from '../helpers/recording-port.js';
import { run, tempDir } from '../helpers/tools.js';
// @ts-expect-error: plain ESM helper shared with the crash test's child process
import { applyOp, crashBatches, explainedBy, runBatch } from '../helpers/qcow2-crash-ops.mjs';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const BATCHES = 40;
const CUTS = 30;

interface Op {
  kind: 'write' | 'zero' | 'discard';
  off: number;
  len: number;
  pattern: number;
}

let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-powerloss-');
});
afterAll(() => dir.remove());

const VARIANTS = [
  { name: 'v3, 64 KiB clusters, over a qcow2 backing file (COW)', cluster: 64 * KiB, opts: [] as string[], backing: true },
  { name: '512 B clusters, 64-bit refcounts (refcount blocks and table grow)', cluster: 512, opts: ['cluster_size=512', 'refcount_bits=64'], backing: false },
];

describe('qcow2 power-loss safety (simulated from the recorded write order)', () => {
  for (const v of VARIANTS) {
    it(`${v.name}: no corruption and flushed batches present at ${CUTS} cut points`, async () => {
      const image = join(dir.path, `${v.cluster}.qcow2`);
      let backing: string | undefined;
      if (v.backing) {
        backing = join(dir.path, `${v.cluster}-base.qcow2`);
        qemuCreate(backing, SIZE);
        qemuIo(backing, [`write -P 0x7e 0 ${SIZE}`]);
      }
      qemuCreate(image, SIZE, v.opts, backing ? { path: backing, format: 'qcow2' } : undefined);
      const start = qemuRaw(image, dir.path);
      const base = readFileSync(image);

      let port: RecordingPort | undefined;
      const img = await openQcow2(image, { readOnly: false, wrapPort: (p) => (port = new RecordingPort(p)) });
      const batches = crashBatches(7 + v.cluster, BATCHES, SIZE, v.cluster) as Op[][];
      const flushReturned: number[] = [];
      for (const batch of batches) {
        await runBatch(img, batch);
        await img.flush();
        flushReturned.push(port!.tick());
      }
      await img.close();

      const rnd = prng(v.cluster);
      const cut = join(dir.path, 'cut.qcow2');
      const raw = join(dir.path, 'cut.raw');
      let leaks = 0;
      for (let k = 0; k < CUTS; k++) {
        const t = 1 + Math.floor(rnd() * port!.clock);
        writeFileSync(cut, port!.crashImage(base, t, rnd));
        const check = qemuCheck(cut);
        const where = `cut ${k} at clock ${t} of ${port!.clock}`;
        expect([0, 3], `${where}: qemu-img check exited ${check.status}\n${check.output}`).toContain(check.status);
        if (check.status === 3) leaks++;

        const flushed = flushReturned.filter((r) => r <= t).length;
        const model = Buffer.from(start);
        for (const batch of batches.slice(0, flushed)) for (const op of batch) applyOp(model, op, v.cluster);
        const pending = batches[flushed] ?? [];
        run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', cut, raw]);
        const actual = readFileSync(raw);
        for (let i = 0; i < SIZE; i++) {
          if (actual[i] === model[i]) continue;
          if (!explainedBy(pending, i, actual[i])) throw new Error(`${where}: byte ${i} is ${actual[i]}, the ${flushed} flushed batches say ${model[i]}`);
        }

        // nbdd's own validation accepts the file and reads what qemu reads.
        const reopened = await openQcow2(cut, { readOnly: true });
        try {
          expect((await reopened.read(0, SIZE)).equals(actual), `${where}: nbdd reads differ from qemu's`).toBe(true);
        } finally {
          await reopened.close();
        }
      }
      rmSync(raw, { force: true });
      expect(port!.syncs.length).toBeGreaterThan(BATCHES);
      console.log(`power loss (${v.cluster} B clusters): ${CUTS} cuts over ${port!.changes.length} recorded changes and ${port!.syncs.length} syncs, ${leaks} with leaks`);
    }, 120_000);
  }
});
