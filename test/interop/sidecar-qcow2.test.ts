/**
 * Persistent bitmaps inside qcow2, against QEMU: bitmaps made by `qemu-img bitmap --add` are
 * tracked by nbdd, bitmaps added through nbdd are listed by `qemu-img info`, and `qemu-nbd -B X`
 * gives the same map as nbdd's sidecar — after a clean stop and after SIGKILL.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/control-client.js';
import { NBD_CMD } from '../../src/nbd/wire/constants.js';
import { ScriptClient, clientFlags, optGo, request } from '../helpers/nbd-script.js';
import { prng } from '../helpers/prng.js';
import { runAsyncOk } from '../helpers/run-async.js';
import { requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  for (const t of ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo']) requireTool(t);
  dir = tempDir('nbdd-q2bm-');
});
afterAll(() => dir.remove());

type Map = [offset: number, length: number][];
/** Dirty extents of `context` as nbdinfo reports them from `uri`. */
async function dirtyMap(bitmap: string, uri: string): Promise<Map> {
  const m = JSON.parse(await runAsyncOk('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, uri])) as { offset: number; length: number; type: number }[];
  return m.filter((e) => e.type === 1).map((e) => [e.offset, e.length]);
}
/** The same map from qemu-nbd -B over the image. */
function qemuMap(img: string, bitmap: string): Map {
  const out = run('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', bitmap, img, ']']);
  return (JSON.parse(out) as { offset: number; length: number; type: number }[]).filter((e) => e.type === 1).map((e) => [e.offset, e.length]);
}
function qemuBitmaps(img: string): { name: string; flags: string[]; granularity: number }[] {
  return JSON.parse(run('qemu-img', ['info', '--output=json', img]))['format-specific'].data.bitmaps ?? [];
}

describe('qcow2 bitmaps shared with QEMU', () => {
  it('tracks qemu-img bitmaps, and qemu-img info / qemu-nbd -B see what nbdd recorded', async () => {
    const img = join(dir.path, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '65536', img, 'qb']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', img], { stdio: 'ignore' });
    const sc = join(dir.path, 'sc-a');
    const srv = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sc]);
    const side = `nbd+unix:///d?socket=${join(sc, 'nbd.sock')}`;
    let maps: Record<string, Map>;
    try {
      expect(await dirtyMap('qb', side)).toEqual([[0, 65536]]);
      const ctl = await ControlClient.connect(join(sc, 'control.sock'));
      await ctl.call('bitmap.add', { name: 'nb', granularity: 4096 });
      await ctl.call('bitmap.add', { name: 'off', disabled: true });
      await ctl.close();
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 2 1M 64k', '-c', 'write -z 8M 1M', '-c', 'discard 20M 64k', '-c', 'write -P 3 40000000 100', srv.uri]);
      maps = { qb: await dirtyMap('qb', side), nb: await dirtyMap('nb', side), off: await dirtyMap('off', side) };
      expect(maps.qb).toEqual([[0, 65536], [MiB, 65536], [8 * MiB, MiB], [20 * MiB, 65536], [39976960, 65536]]);
      expect(maps.off).toEqual([]);
    } finally {
      await srv.stop();
    }
    expect(qemuBitmaps(img)).toEqual([
      { flags: ['auto'], name: 'qb', granularity: 65536 },
      { flags: ['auto'], name: 'nb', granularity: 4096 },
      { flags: [], name: 'off', granularity: 65536 },
    ]);
    expect(runStatus('qemu-img', ['check', img]).status).toBe(0);
    for (const b of ['qb', 'nb', 'off']) expect(qemuMap(img, b), b).toEqual(maps[b]);
    // And QEMU edits nbdd's bitmaps: nbdd sees the change at its next open.
    execFileSync('qemu-img', ['bitmap', '--clear', img, 'nb']);
    const again = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sc]);
    try {
      expect(await dirtyMap('nb', side)).toEqual([]);
      expect(await dirtyMap('qb', side)).toEqual(maps.qb);
    } finally {
      await again.stop();
    }
  });

  it('after SIGKILL the bitmaps stay consistent for QEMU and cover every changed granule', async () => {
    const img = join(dir.path, 'k.qcow2');
    // Preallocated metadata: writes land in place, so unflushed ones are visible after the kill
    // (fresh allocations only appear once their L2 entries are committed).
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', img, '32M']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '65536', img, 'b0']);
    const sc = join(dir.path, 'sc-k');
    const rnd = prng(99);
    const r = { next: rnd, int: (n: number) => Math.floor(rnd() * n) };
    let changedTotal = 0;
    for (let round = 0; round < 4; round++) {
      const rawBefore = join(dir.path, `before-${round}.raw`);
      execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, rawBefore]);
      execFileSync('qemu-img', ['bitmap', '--clear', img, 'b0']);
      const srv = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sc]);
      const exited = new Promise<void>((res) => srv.child.once('exit', () => res()));
      const c = await ScriptClient.connect(srv.socket);
      await c.readGreeting();
      c.send(clientFlags());
      c.send(optGo('d'));
      await c.readOptionReplies();
      for (let i = 0; i < 300; i++) {
        const off = r.int(32 * MiB / 4096 - 16) * 4096;
        const len = 4096 * (1 + r.int(16));
        c.send(request(NBD_CMD.WRITE, i + 1, off, len, 0, Buffer.alloc(len, 1 + r.int(255))));
      }
      await new Promise((res) => setTimeout(res, 30 + r.int(200)));
      srv.child.kill('SIGKILL');
      await exited;
      c.destroy();
      // QEMU must accept the image and its bitmap (not in_use), and the bitmap must cover the changes.
      expect([0, 3]).toContain(runStatus('qemu-img', ['check', img]).status);
      expect(qemuBitmaps(img)).toEqual([{ flags: ['auto'], name: 'b0', granularity: 65536 }]);
      const rawAfter = join(dir.path, `after-${round}.raw`);
      execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, rawAfter]);
      const a = readFileSync(rawBefore);
      const b = readFileSync(rawAfter);
      const map = qemuMap(img, 'b0');
      const dirty = (off: number) => map.some(([o, l]) => o <= off && off < o + l);
      for (let g = 0; g < a.length; g += 65536) {
        if (!a.subarray(g, g + 65536).equals(b.subarray(g, g + 65536))) {
          changedTotal++;
          expect(dirty(g), `granule at ${g}, round ${round}`).toBe(true);
        }
      }
    }
    console.log(`qcow2 crash test: 4 rounds, ${changedTotal} changed 64 KiB granules, all marked`);
    expect(changedTotal).toBeGreaterThan(20);
  });
});
