/**
 * Crash safety of persistent bitmaps (write-intent): `nbdd serve` on a raw image takes pipelined
 * random writes and is SIGKILLed at a random moment, many rounds. After each, every granule whose
 * bytes changed in the image must be marked in the bitmaps read back from the sidecar file —
 * including writes that reached the file but were never acknowledged. Zero misses allowed.
 */
import { closeSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SidecarFileStore, defaultSidecarPath } from '../../src/bitmaps/store-sidecar-file.js';
import { ControlClient } from '../../src/control/control-client.js';
import { NBD_CMD } from '../../src/nbd/wire/constants.js';
import { ScriptClient, clientFlags, optGo, request } from '../helpers/nbd-script.js';
import { prng } from '../helpers/prng.js';
import { serveNbdd, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const ROUNDS = 20;
const BITMAPS = [
  { name: 'b0', granularity: 65536 },
  { name: 'fine', granularity: 4096 },
];

let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  dir = tempDir('nbdd-crash-');
});
afterAll(() => dir.remove());

/** Granules (of `g` bytes) whose bytes differ between two images. */
function changedGranules(a: Buffer, b: Buffer, g: number): number[] {
  const out: number[] = [];
  for (let at = 0; at < a.length; at += g) {
    if (!a.subarray(at, at + g).equals(b.subarray(at, at + g))) out.push(at / g);
  }
  return out;
}

async function connect(socket: string, exportName: string): Promise<ScriptClient> {
  const c = await ScriptClient.connect(socket);
  await c.readGreeting();
  c.send(clientFlags());
  c.send(optGo(exportName));
  const replies = await c.readOptionReplies();
  if (replies[replies.length - 1]!.type !== 1) throw new Error('GO refused');
  return c;
}

describe('persistent bitmaps survive SIGKILL (write-intent)', () => {
  it(`marks every changed granule after ${ROUNDS} random kills`, async () => {
    const img = join(dir.path, 'disk.raw');
    const fd = openSync(img, 'w');
    ftruncateSync(fd, SIZE);
    closeSync(fd);
    const sidecarDir = join(dir.path, 'sc');
    const rnd = prng(20261121);
    const r = { next: rnd, int: (n: number) => Math.floor(rnd() * n) };
    let totalChanged = 0;
    let misses = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const before = readFileSync(img);
      const srv = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sidecarDir]);
      const exited = new Promise<void>((res) => srv.child.once('exit', () => res()));
      try {
        const ctl = await ControlClient.connect(join(sidecarDir, 'control.sock'));
        for (const b of BITMAPS) {
          if (round === 0) await ctl.call('bitmap.add', { name: b.name, granularity: b.granularity });
          else await ctl.call('bitmap.clear', { name: b.name }); // durable when answered
        }
        await ctl.close();
        const nbd = await connect(srv.socket, 'd');
        // Pipelined writes (never waiting for replies), then a kill at a random moment.
        let cookie = 1;
        const sending = (async () => {
          for (let i = 0; i < 400 && srv.child.exitCode === null; i++) {
            const off = r.int(SIZE / 512 - 1) * 512;
            const len = Math.min(SIZE - off, 512 * (1 + r.int(r.next() < 0.8 ? 16 : 512)));
            const kind = r.next();
            if (kind < 0.8) nbd.send(request(NBD_CMD.WRITE, cookie++, off, len, 0, Buffer.alloc(len, 1 + r.int(255))));
            else if (kind < 0.9) nbd.send(request(NBD_CMD.WRITE_ZEROES, cookie++, off, len));
            else nbd.send(request(NBD_CMD.TRIM, cookie++, off, len));
            if (i % 16 === 15) await new Promise((res) => setImmediate(res));
          }
        })();
        await new Promise((res) => setTimeout(res, 5 + r.int(300)));
        srv.child.kill('SIGKILL');
        await exited;
        await sending;
        nbd.destroy();
      } catch (err) {
        srv.child.kill('SIGKILL');
        throw new Error(`round ${round}: ${(err as Error).message}\n${srv.stderr()}`);
      }
      // Reopen the bitmaps as the next daemon would, and check them against the image.
      const after = readFileSync(img);
      const store = await SidecarFileStore.open(defaultSidecarPath(img), SIZE);
      const stored = await store.load();
      for (const b of BITMAPS) {
        const bits = stored.find((s) => s.name === b.name)!.bits;
        const changed = changedGranules(before, after, b.granularity);
        if (b.name === 'fine') totalChanged += changed.length;
        misses += changed.filter((gi) => !bits.get(gi)).length;
      }
      await store.close([]);
    }
    console.log(`crash test: ${ROUNDS} rounds, ${totalChanged} changed 4 KiB granules, ${misses} misses`);
    expect(misses).toBe(0);
    // The test is only meaningful if writes landed before the kills.
    expect(totalChanged).toBeGreaterThan(ROUNDS * 5);
    // And the image opens again with its bitmaps, no full backup needed.
    const srv = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sidecarDir]);
    const ctl = await ControlClient.connect(join(sidecarDir, 'control.sock'));
    expect((await ctl.call<{ name: string }[]>('bitmap.list')).map((b) => b.name)).toEqual(['b0', 'fine']);
    await ctl.close();
    await srv.stop();
  });
});
