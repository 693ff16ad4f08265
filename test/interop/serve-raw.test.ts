/**
 * `nbdd serve` on a raw file, driven by the real tools users have: nbdinfo, nbdcopy, qemu-img,
 * qemu-io. Each test starts its own server and stops it with SIGTERM, requiring a clean exit.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  for (const t of ['nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io']) requireTool(t);
  dir = tempDir();
});
afterAll(() => dir.remove());

/** A sparse raw image with data at 1 MiB (64 KiB of 0xa1) and 20 MiB (1 MiB of a pattern). */
function makeImage(name: string): string {
  const path = join(dir.path, name);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, SIZE);
  writeSync(fd, Buffer.alloc(64 * 1024, 0xa1), 0, 64 * 1024, 1 * MiB);
  const pat = Buffer.alloc(MiB);
  for (let i = 0; i < pat.length; i++) pat[i] = (i * 31) & 0xff;
  writeSync(fd, pat, 0, pat.length, 20 * MiB);
  closeSync(fd);
  return path;
}

const sha = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

describe('nbdd serve (raw) with nbdinfo', () => {
  it('reports size, export name, capabilities and the allocation map', async () => {
    const img = makeImage('info.img');
    const srv = await serveNbdd(img, ['--export-name', 'disk0', '--description', 'test image']);
    try {
      const info = JSON.parse(run('nbdinfo', ['--json', srv.uri]));
      const exp = info.exports[0];
      expect(exp['export-name']).toBe('disk0');
      expect(exp['export-size']).toBe(SIZE);
      expect(exp.description).toBe('test image');
      expect(exp['is_read_only']).toBe(false);
      for (const cap of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn', 'can_df', 'can_fast_zero', 'can_cache']) {
        expect(exp[cap], cap).toBe(true);
      }
      expect(exp['block_size_maximum']).toBe(32 * MiB);
      expect(info.protocol).toBe('newstyle-fixed');
      expect(exp.contexts).toEqual(expect.arrayContaining(['base:allocation', 'qemu:allocation-depth']));

      const list = run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${srv.socket}`]);
      expect(JSON.parse(list).exports.map((e: { 'export-name': string }) => e['export-name'])).toEqual(['disk0']);

      const map = JSON.parse(run('nbdinfo', ['--map', '--json', srv.uri])) as { offset: number; length: number; type: number }[];
      const data = map.filter((e) => (e.type & 1) === 0);
      const covered = (off: number): boolean => data.some((e) => e.offset <= off && off < e.offset + e.length);
      expect(covered(1 * MiB) && covered(1 * MiB + 65535) && covered(20 * MiB) && covered(21 * MiB - 1)).toBe(true);
      expect(covered(10 * MiB)).toBe(false); // a hole on any filesystem with SEEK_HOLE
      expect(map.reduce((s, e) => s + e.length, 0)).toBe(SIZE);
    } finally {
      await srv.stop();
    }
  });

  it('is read-only with --read-only, and writes fail with EPERM', async () => {
    const img = makeImage('ro.img');
    const before = sha(img);
    const srv = await serveNbdd(img, ['--read-only']);
    try {
      expect(runStatus('nbdinfo', ['--is', 'read-only', srv.uri]).status).toBe(0);
      const w = runStatus('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 4k', srv.uri]);
      expect(w.stdout + w.stderr).toMatch(/Operation not permitted|Permission denied|read-only/i);
    } finally {
      await srv.stop();
    }
    expect(sha(img)).toBe(before);
  });
});

describe('nbdd serve (raw) with nbdcopy and qemu-img', () => {
  it('copies out byte-identical with nbdcopy and qemu-img convert, and compares equal', async () => {
    const img = makeImage('src.img');
    const srv = await serveNbdd(img);
    try {
      const out1 = join(dir.path, 'copy1.img');
      run('nbdcopy', [srv.uri, out1]);
      expect(sha(out1)).toBe(sha(img));
      const out2 = join(dir.path, 'copy2.img');
      run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri, out2]);
      expect(sha(out2)).toBe(sha(img));
      expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, srv.uri]).status).toBe(0);
    } finally {
      await srv.stop();
    }
  });

  it('takes a full image written in by nbdcopy (multi-conn) and qemu-img convert', async () => {
    const src = makeImage('in.img');
    for (const tool of ['nbdcopy', 'qemu-img'] as const) {
      const target = join(dir.path, `target-${tool}.img`);
      writeFileSync(target, '');
      run('truncate', ['-s', String(SIZE), target]);
      const srv = await serveNbdd(target);
      try {
        if (tool === 'nbdcopy') run('nbdcopy', ['--flush', '-C', '4', src, srv.uri]);
        else run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, srv.uri]);
      } finally {
        await srv.stop();
      }
      expect(sha(target), tool).toBe(sha(src));
    }
  });
});

describe('nbdd serve (raw) with qemu-io', () => {
  it('writes, zeroes and discards with pattern verification, through the server and on the file', async () => {
    const img = makeImage('io.img');
    const srv = await serveNbdd(img);
    try {
      const out = run('qemu-io', [
        '-f', 'raw',
        '-c', 'write -P 0x11 0 128k',
        '-c', 'write -f -P 0x22 4M 4k', // FUA
        '-c', 'write -P 0x33 5000 3000', // unaligned
        '-c', 'write -z 1M 64k',
        '-c', 'write -z -u 20M 512k', // may unmap
        '-c', 'discard 21M 256k',
        '-c', 'flush',
        '-c', 'read -P 0x11 0 5000',
        '-c', 'read -P 0x33 5000 3000',
        '-c', 'read -P 0x11 8000 123072',
        '-c', 'read -P 0x22 4M 4k',
        '-c', 'read -P 0 1M 64k',
        '-c', 'read -P 0 20M 512k',
        srv.uri,
      ]);
      expect(out).not.toMatch(/fail|error|mismatch/i);
    } finally {
      await srv.stop();
    }
    const file = readFileSync(img);
    expect(file.subarray(0, 5000).every((b) => b === 0x11)).toBe(true);
    expect(file.subarray(5000, 8000).every((b) => b === 0x33)).toBe(true);
    expect(file.subarray(4 * MiB, 4 * MiB + 4096).every((b) => b === 0x22)).toBe(true);
    expect(file.subarray(1 * MiB, 1 * MiB + 65536).every((b) => b === 0)).toBe(true);
    expect(file.subarray(20 * MiB, 20 * MiB + 512 * 1024).every((b) => b === 0)).toBe(true);
    // Discard is advisory for the protocol, but on a raw file nbdd punches a hole: zeroes.
    expect(file.subarray(21 * MiB, 21 * MiB + 256 * 1024).every((b) => b === 0)).toBe(true);
  });

  it('serves concurrent clients writing disjoint regions', async () => {
    const img = makeImage('conc.img');
    const srv = await serveNbdd(img);
    try {
      const jobs = Array.from({ length: 6 }, (_, i) =>
        new Promise<number>((resolve) => {
          const p = spawn('qemu-io', ['-f', 'raw', '-c', `write -P ${0x40 + i} ${i * 2}M 2M`, '-c', `read -P ${0x40 + i} ${i * 2}M 2M`, srv.uri], { stdio: 'ignore' });
          p.on('exit', (code) => resolve(code ?? -1));
        }),
      );
      expect(await Promise.all(jobs)).toEqual([0, 0, 0, 0, 0, 0]);
    } finally {
      await srv.stop();
    }
    const file = readFileSync(img);
    for (let i = 0; i < 6; i++) expect(file.subarray(i * 2 * MiB, (i + 1) * 2 * MiB).every((b) => b === 0x40 + i), `client ${i}`).toBe(true);
  });
});

describe('nbdd serve --run', () => {
  it('runs the command with $uri and exits with its status', () => {
    const img = makeImage('run.img');
    expect(run(NBDD, ['serve', img, '--run', 'nbdinfo --size "$uri"']).trim()).toBe(String(SIZE));
    expect(runStatus(NBDD, ['serve', img, '--run', 'exit 3']).status).toBe(3);
  });

  it('refuses a second writer on the same raw file with a clear message', async () => {
    const img = makeImage('lock.img');
    const srv = await serveNbdd(img);
    try {
      const second = runStatus(NBDD, ['serve', img, '--run', 'true']);
      expect(second.status).not.toBe(0);
      expect(second.stderr).toMatch(/lock|in use|another/i);
    } finally {
      await srv.stop();
    }
  });

  it('fails clearly on a missing image and on a bad size argument', () => {
    const missing = runStatus(NBDD, ['serve', join(dir.path, 'nope.img'), '--run', 'true']);
    expect(missing.status).not.toBe(0);
    expect(missing.stderr).toMatch(/nope\.img/);
    expect(missing.stderr).not.toMatch(/at .*\.js/); // a message, not a stack trace
  });
});
