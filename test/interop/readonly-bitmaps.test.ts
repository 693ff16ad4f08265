/**
 * Persistent bitmaps of a read-only export, against qemu-nbd: `nbdd serve IMG --read-only`
 * publishes the image's qcow2 bitmaps (made by `qemu-img bitmap`) on its sidecar, and with
 * `-B NAME` on the main export too, with the same map as `qemu-nbd -r -B NAME` — and the image
 * file keeps every byte.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runAsyncOk } from '../helpers/run-async.js';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

let dir: ReturnType<typeof tempDir>;
let img: string;
beforeAll(() => {
  for (const t of ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo']) requireTool(t);
  dir = tempDir('nbdd-robm-');
  img = join(dir.path, 'ro.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
  execFileSync('qemu-img', ['bitmap', '--add', img, 'b0']);
  execFileSync('qemu-img', ['bitmap', '--add', '-g', '131072', img, 'b1']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 1M 64k', '-c', 'write -P 2 5M 300k', img], { stdio: 'ignore' });
  execFileSync('qemu-img', ['bitmap', '--disable', img, 'b1']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write 9M 4k', img], { stdio: 'ignore' });
});
afterAll(() => dir.remove());

type Extent = { offset: number; length: number; type: number };
async function nbdMap(bitmap: string, uri: string): Promise<Extent[]> {
  return JSON.parse(await runAsyncOk('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, uri])) as Extent[];
}
function qemuMap(bitmap: string): Extent[] {
  return JSON.parse(run('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', bitmap, img, ']'])) as Extent[];
}

describe('bitmaps on a read-only export', () => {
  it('match qemu-nbd -r -B on the sidecar and, with -B, on the main export; the image is unchanged', async () => {
    const before = readFileSync(img);
    const expected = { b0: qemuMap('b0'), b1: qemuMap('b1') };
    // What qemu-img wrote: b0 saw all three writes, b1 (disabled before the last) two of them.
    expect(expected.b0.filter((e) => e.type === 1).map((e) => e.offset)).toEqual([1 << 20, 5 << 20, 9 << 20]);
    expect(expected.b1.filter((e) => e.type === 1).map((e) => e.offset)).toEqual([1 << 20, 5 << 20]);
    const sc = join(dir.path, 'sc');
    const srv = await serveNbdd(img, ['--read-only', '--export-name', 'd', '--sidecar', sc, '-B', 'b0', '--bitmap', 'b1']);
    try {
      const side = `nbd+unix:///d?socket=${join(sc, 'nbd.sock')}`;
      for (const b of ['b0', 'b1'] as const) {
        expect(await nbdMap(b, side), `sidecar ${b}`).toEqual(expected[b]);
        expect(await nbdMap(b, srv.uri), `main export ${b}`).toEqual(expected[b]);
      }
    } finally {
      await srv.stop();
    }
    expect(readFileSync(img).equals(before)).toBe(true);
    expect(runStatus('qemu-img', ['check', img]).status).toBe(0);
  });

  it('publishes on the main export only the bitmaps -B names', async () => {
    const srv = await serveNbdd(img, ['--read-only', '-B', 'b1']);
    try {
      const contexts = await runAsyncOk('nbdinfo', [srv.uri]);
      expect(contexts).toContain('qemu:dirty-bitmap:b1');
      expect(contexts).not.toContain('qemu:dirty-bitmap:b0');
    } finally {
      await srv.stop();
    }
  });

  it('refuses -B of a bitmap the image does not have, naming it and the ones it has', () => {
    const before = readFileSync(img);
    const r = runStatus(NBDD, ['serve', img, '--read-only', '--socket', join(dir.path, 'x.sock'), '-B', 'nope']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/bitmap 'nope' not found \(the image has 'b0', 'b1'\)/);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    expect(readFileSync(img).equals(before)).toBe(true);
  });

  it('drops a bitmap QEMU left in use rather than publishing bits that may miss writes', async () => {
    // A qemu-io session killed while it has the image open for writing leaves its bitmaps in_use.
    const used = join(dir.path, 'inuse.qcow2');
    execFileSync('cp', [img, used]);
    execFileSync('sh', ['-c', `(echo 'write 2M 4k'; sleep 5) | qemu-io -f qcow2 ${used} & sleep 1.5; kill -9 $!`], { stdio: 'ignore' });
    const info = JSON.parse(run('qemu-img', ['info', '-U', '--output=json', used]))['format-specific'].data.bitmaps as { name: string; flags: string[] }[];
    expect(info.find((b) => b.name === 'b0')?.flags).toContain('in-use');
    const before = readFileSync(used);
    const sc = join(dir.path, 'sc-inuse');
    const srv = await serveNbdd(used, ['--read-only', '--export-name', 'd', '--sidecar', sc]);
    try {
      expect(await runAsyncOk('nbdinfo', [`nbd+unix:///d?socket=${join(sc, 'nbd.sock')}`])).not.toContain('qemu:dirty-bitmap:b0');
      expect(srv.stderr()).toMatch(/bitmap 'b0' is inconsistent \(in_use\)/);
    } finally {
      await srv.stop();
    }
    expect(readFileSync(used).equals(before)).toBe(true);
  });

  it('refuses, as qemu-nbd does, an image whose bitmap table is misplaced — with nbdd\'s message and no byte changed', () => {
    const bad = join(dir.path, 'bad.qcow2');
    execFileSync('cp', [img, bad]);
    const bytes = readFileSync(bad);
    // The bitmaps extension (0x23852875) names the directory; its first entry starts with the table offset.
    let at = bytes.readUInt32BE(100);
    let directory = -1;
    while (at < 65536) {
      const [type, len] = [bytes.readUInt32BE(at), bytes.readUInt32BE(at + 4)];
      if (type === 0x23852875) directory = Number(bytes.readBigUInt64BE(at + 24));
      if (type === 0 || directory >= 0) break;
      at += 8 + ((len + 7) & ~7);
    }
    expect(directory).toBeGreaterThan(0);
    bytes.writeBigUInt64BE(12345n * 512n, directory);
    writeFileSync(bad, bytes);
    const r = runStatus(NBDD, ['serve', bad, '--read-only', '--socket', join(dir.path, 'bad.sock')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/corrupt qcow2 image: bitmap 'b0' table at \d+ \(1 entries\) is misplaced/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(readFileSync(bad).equals(bytes)).toBe(true);
    expect(runStatus('qemu-nbd', ['-r', '-f', 'qcow2', '-k', join(dir.path, 'q.sock'), bad]).stderr).toMatch(/doesn't satisfy the constraints/);
  });
});
