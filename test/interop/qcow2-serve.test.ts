/**
 * A qcow2 image (with a backing chain) served by `nbdd serve`, checked by qemu-img and qemu-io over
 * the NBD URI: contents identical to the image as qemu reads it, writes over NBD land in a
 * qcow2 that `qemu-img check` finds clean.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  requireQemu();
  requireTool('nbdinfo');
  dir = tempDir('nbdd-qcow2-serve-');
});
afterAll(() => dir.remove());

function chain(name: string): string {
  const base = join(dir.path, `${name}-base.qcow2`);
  const top = join(dir.path, `${name}.qcow2`);
  qemuCreate(base, 16 * MiB);
  qemuIo(base, ['write -P 0xb0 0 4M', 'write -P 0xb1 9M 1M']);
  qemuCreate(top, 16 * MiB, [], { path: base, format: 'qcow2' });
  qemuIo(top, ['write -P 0x70 1M 3M', 'write -z 9M 64k', 'write -P 0x71 12345 777']);
  return top;
}

describe('nbdd serve with a qcow2 image', () => {
  it('serves the same contents qemu reads (qemu-img compare over NBD)', async () => {
    const img = chain('ro');
    const srv = await serveNbdd(img, ['--read-only']);
    try {
      const cmp = runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', srv.uri, img]);
      expect(cmp.stdout).toContain('Images are identical');
      expect(cmp.status).toBe(0);
      const map = run('nbdinfo', ['--map=qemu:allocation-depth', srv.uri]);
      const rows = map.trim().split('\n').map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
      const K = 1024;
      expect(rows).toEqual([
        [0, 64 * K, 1],
        [64 * K, MiB - 64 * K, 2],
        [MiB, 3 * MiB, 1],
        [4 * MiB, 5 * MiB, 0],
        [9 * MiB, 64 * K, 1],
        [9 * MiB + 64 * K, MiB - 64 * K, 2],
        [10 * MiB, 6 * MiB, 0],
      ]);
    } finally {
      await srv.stop();
    }
  });

  it('takes writes over NBD and leaves a clean image', async () => {
    const img = chain('rw');
    const expected = qemuRaw(img, dir.path);
    const srv = await serveNbdd(img);
    try {
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5e 2M 3M', '-c', 'write -z 8M 2M', '-c', 'discard 12M 1M', '-c', 'flush', srv.uri]);
      expected.fill(0x5e, 2 * MiB, 5 * MiB);
      expected.fill(0, 8 * MiB, 10 * MiB);
      expected.fill(0, 12 * MiB, 13 * MiB);
      run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5e 2M 3M', srv.uri]);
    } finally {
      await srv.stop();
    }
    const check = qemuCheck(img);
    expect(check.output).toContain('No errors were found');
    expect(check.status).toBe(0);
    expect(qemuRaw(img, dir.path).equals(expected)).toBe(true);
  });
});
