/**
 * `nbdd backup` / `backups` / `restore` / `verify` (src/backup/) against a served qcow2 and raw
 * image (`nbdd serve --name`, through its sidecar) and a remote `qemu-nbd -B b0`: points equal
 * the disk at their begin (checked by sha256 of the restored disk and by qemu-img compare of the
 * point file), incrementals store about what changed, writes during a backup do not reach its
 * point, a SIGKILLed daemon or backup costs nothing, a flipped byte fails verify, and bad input
 * leaves the repo untouched.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, readSync, readdirSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openNbd, type NbdBackend } from '../../src/backends/nbd.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { INTENT_REGION } from '../../src/bitmaps/bitmap-set.js';
import { ControlClient } from '../../src/control/control-client.js';
import { runAsync, runAsyncOk } from '../helpers/run-async.js';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir, type Served } from '../helpers/tools.js';
import { startQemuNbdAt } from './nbd-peers.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let n = 0;
beforeAll(() => {
  for (const t of ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdcopy']) requireTool(t);
  dir = tempDir('nbdd-backup-');
});
afterAll(() => dir.remove());

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const fileSha = (path: string): string => sha(readFileSync(path));

/** The whole export, as bytes (nbdcopy). */
async function contents(uri: string): Promise<Buffer> {
  const out = join(dir.path, `copy-${n++}.raw`);
  await runAsyncOk('nbdcopy', [uri, out]);
  return readFileSync(out);
}

async function restored(repo: string, point?: string): Promise<Buffer> {
  const out = join(dir.path, `restored-${n++}.raw`);
  await runAsyncOk(NBDD, ['restore', '--repo', repo, ...(point ? ['--point', point] : []), out]);
  return readFileSync(out);
}

interface Result {
  point: string;
  kind: string;
  file: string;
  bytesStored: number;
}
async function backupOf(source: string, repo: string, args: string[] = []): Promise<Result> {
  return JSON.parse(await runAsyncOk(NBDD, ['backup', source, '--repo', repo, '--json', ...args], 120_000)) as Result;
}

async function served(image: string, args: string[] = []): Promise<{ srv: Served; name: string; client: NbdBackend }> {
  const name = `bk-${process.pid}-${n++}`;
  const srv = await serveNbdd(image, ['--name', name, ...args]);
  return { srv, name, client: await openNbd(srv.uri) };
}

/** Polls the device's status until a backup is running (true) or 8 s have passed (false). */
async function backupBegun(control: ControlClient): Promise<boolean> {
  for (const deadline = Date.now() + 8000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 2))) {
    if (((await control.call('status')) as { backup: unknown }).backup !== null) return true;
  }
  return false;
}

function qcow2(size: number): string {
  const path = join(dir.path, `disk-${n++}.qcow2`);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(size)]);
  return path;
}

describe('nbdd backup of a served qcow2 (sidecar)', () => {
  it('full then incremental: each point restores to the disk at its begin; the incremental stores about what changed', async () => {
    const img = qcow2(64 * MiB);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-basic');
    try {
      await client.write(0, randomBytes(6 * MiB));
      await client.write(40 * MiB, randomBytes(2 * MiB));
      const at1 = await contents(srv.uri);
      const p1 = await backupOf(name, repo);
      expect(p1).toMatchObject({ point: '0001', kind: 'full', file: '0001-full.qcow2', bytesStored: 8 * MiB });

      await client.write(MiB, randomBytes(256 * 1024));
      await client.writeZeroes(40 * MiB, 64 * 1024);
      await client.write(63 * MiB, randomBytes(4096));
      const at2 = await contents(srv.uri);
      const p2 = await backupOf(name, repo);
      expect(p2.kind).toBe('incremental');
      expect(p2.bytesStored).toBeGreaterThanOrEqual(256 * 1024 + 4096);
      expect(p2.bytesStored).toBeLessThanOrEqual(256 * 1024 + 64 * 1024); // the 4 KiB write costs one 64 KiB granule

      expect(sha(await restored(repo, '0001'))).toBe(sha(at1));
      expect(sha(await restored(repo))).toBe(sha(at2));
      // The point files are plain qcow2 that qemu reads, the incremental through its backing chain.
      const want2 = join(dir.path, 'want2.raw');
      writeFileSync(want2, at2);
      expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', want2, join(repo, p2.file)]).stdout).toContain('Images are identical');
      const chain = run('qemu-img', ['info', '--backing-chain', join(repo, p2.file)]);
      expect(chain).toMatch(/backing file: 0001-full\.qcow2/);

      const listed = JSON.parse(run(NBDD, ['backups', '--repo', repo, '--json'])) as { id: string; kind: string; file: string; bytes: number; virtualSize: number; time: string }[];
      expect(listed.map((p) => [p.id, p.kind, p.file, p.virtualSize])).toEqual([
        ['0001', 'full', '0001-full.qcow2', 64 * MiB],
        ['0002', 'incremental', '0002-inc.qcow2', 64 * MiB],
      ]);
      expect(listed[1]!.bytes).toBe(p2.bytesStored);
      expect(run(NBDD, ['verify', '--repo', repo])).toMatch(/point 0002: ok/);
      // Only the newest point's checkpoint bitmap stays on the device.
      const status = JSON.parse(run(NBDD, ['status', name, '--json'])) as { bitmaps: { name: string; enabled: boolean }[]; backup: unknown };
      expect(status.bitmaps.map((b) => b.name)).toEqual([expect.stringMatching(/^nbdd-backup-[0-9a-f]{8}-0002$/)]);
      expect(status.backup).toBeNull();
    } finally {
      await client.close();
      await srv.stop();
    }
  });

  it('writes made while the backup runs do not reach its point (point-in-time), and the next incremental has them', async () => {
    const img = qcow2(128 * MiB);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-pit');
    const control = await ControlClient.connect(join('/run/nbdd', name, 'control.sock'));
    try {
      await client.write(0, randomBytes(96 * MiB));
      const atBegin = await contents(srv.uri);
      const job = runAsync(NBDD, ['backup', name, '--repo', repo, '--json'], 120_000);
      // Writes after the backup has begun (status shows it): at the start, middle and end.
      expect(await backupBegun(control)).toBe(true);
      await Promise.all([client.write(0, Buffer.alloc(MiB, 0xee)), client.write(48 * MiB, Buffer.alloc(MiB, 0xee)), client.write(95 * MiB, Buffer.alloc(MiB, 0xee))]);
      const stillRunning = ((await control.call('status')) as { backup: unknown }).backup !== null;
      const r = await job;
      expect(r.code, r.stderr).toBe(0);
      expect(stillRunning, 'the writes landed while the backup ran').toBe(true);
      expect(sha(await restored(repo))).toBe(sha(atBegin));
      const after = await contents(srv.uri);
      expect((await backupOf(name, repo)).kind).toBe('incremental');
      expect(sha(await restored(repo))).toBe(sha(after));
    } finally {
      await control.close();
      await client.close();
      await srv.stop();
    }
  });

  it('random unaligned writes, zeroes and trims all through the backup do not reach its point (raw image, twice)', async () => {
    const img = join(dir.path, `mess-${n++}.img`);
    run('truncate', ['-s', String(64 * MiB), img]);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-mess');
    const control = await ControlClient.connect(join('/run/nbdd', name, 'control.sock'));
    const rnd = (k: number): number => Math.floor(Math.random() * k);
    const mess = async (count: number): Promise<void> => {
      const ops: Promise<void>[] = [];
      for (let i = 0; i < count; i++) {
        const offset = rnd(64 * 2048 - 300) * 512;
        const length = (1 + rnd(256)) * 512;
        const k = rnd(10);
        ops.push(k < 7 ? client.write(offset, randomBytes(length), { fua: k === 0 }) : k < 9 ? client.writeZeroes(offset, length) : client.trim(offset, length));
      }
      await Promise.all(ops);
      await client.flush();
    };
    try {
      await client.write(0, randomBytes(32 * MiB));
      await backupOf(name, repo);
      for (let round = 0; round < 2; round++) {
        await mess(300);
        const atBegin = readFileSync(img);
        const job = runAsync(NBDD, ['backup', name, '--repo', repo, '--json'], 120_000);
        expect(await backupBegun(control)).toBe(true);
        let running = true;
        void job.then(() => (running = false));
        let batches = 0;
        for (; running; batches++) await mess(20);
        const r = await job;
        expect(r.code, r.stderr).toBe(0);
        expect(batches, 'writes landed while the backup ran').toBeGreaterThan(0);
        expect(sha(await restored(repo))).toBe(sha(atBegin));
      }
    } finally {
      await control.close();
      await client.close();
      await srv.stop();
    }
  });

  it('a SIGKILLed daemon (between backups) and a SIGKILLed backup (mid-copy) cost no full backup: the next one is incremental, exact in content, its copy bounded by the intent regions written', async () => {
    const img = qcow2(96 * MiB);
    let { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-crash');
    await client.write(0, randomBytes(64 * MiB));
    await backupOf(name, repo);
    await client.write(10 * MiB, randomBytes(MiB));
    await client.close();
    srv.child.kill('SIGKILL');
    await new Promise((r) => srv.child.once('exit', r));
    // Re-served under the same name (the bitmaps come back from the image), more writes, a backup.
    srv = await serveNbdd(img, ['--name', name]);
    client = await openNbd(srv.uri);
    try {
      await client.write(70 * MiB, randomBytes(MiB));
      const at2 = await contents(srv.uri);
      const p2 = await backupOf(name, repo);
      expect(p2.kind).toBe('incremental');
      // The write before the kill comes back as its whole write-intent region (what the image
      // held at the kill, docs/sidecar.md); the write after the restart exactly.
      const region = (offset: number, length: number): number => Math.ceil((offset + length) / INTENT_REGION) * INTENT_REGION - Math.floor(offset / INTENT_REGION) * INTENT_REGION;
      expect(p2.bytesStored).toBe(region(10 * MiB, MiB) + MiB);
      expect(sha(await restored(repo))).toBe(sha(at2));

      // A backup killed while it copies: the repo keeps its two points and stays valid.
      await client.write(0, randomBytes(60 * MiB));
      const manifestBefore = fileSha(join(repo, 'manifest.json'));
      const { spawn } = await import('node:child_process');
      const child = spawn(NBDD, ['backup', name, '--repo', repo], { stdio: 'ignore' });
      const control = await ControlClient.connect(join('/run/nbdd', name, 'control.sock'));
      const running = await backupBegun(control);
      await control.close();
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      expect(running).toBe(true);
      expect(fileSha(join(repo, 'manifest.json'))).toBe(manifestBefore);
      expect(run(NBDD, ['verify', '--repo', repo])).toMatch(/point 0002: ok/);

      await client.write(90 * MiB, randomBytes(MiB));
      const at3 = await contents(srv.uri);
      const p3 = await backupOf(name, repo);
      expect(p3).toMatchObject({ point: '0003', kind: 'incremental' });
      expect(p3.bytesStored).toBe(61 * MiB); // everything since point 2, the killed backup's share too
      expect(sha(await restored(repo))).toBe(sha(at3));
      expect(readdirSync(repo).filter((f) => f.startsWith('.partial'))).toEqual([]);
    } finally {
      await client.close();
      await srv.stop();
    }
  });

  it('a raw image (bitmaps in the sidecar file) backs up the same way', async () => {
    const img = join(dir.path, `raw-${n++}.img`);
    run('truncate', ['-s', String(32 * MiB), img]);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-raw');
    try {
      await client.write(MiB, randomBytes(3 * MiB));
      await backupOf(name, repo);
      await client.write(20 * MiB, randomBytes(128 * 1024));
      const now = await contents(srv.uri);
      const p2 = await backupOf(name, repo);
      expect(p2).toMatchObject({ kind: 'incremental', bytesStored: 128 * 1024 });
      expect(sha(await restored(repo))).toBe(sha(now));
    } finally {
      await client.close();
      await srv.stop();
    }
  });
});

describe('nbdd backup --compress', () => {
  for (const codec of ['zstd', 'deflate'] as const) {
    it(`${codec}: points hold compressed clusters qemu reads, restore exactly, verify, and take less space`, async () => {
      const img = qcow2(64 * MiB);
      const { srv, name, client } = await served(img);
      const repo = join(dir.path, `repo-compress-${codec}`);
      const text = (len: number, seed: number): Buffer => {
        const out = Buffer.alloc(len);
        for (let at = 0; at < len; ) at += out.write(`line ${seed} ${at % 9973} of a log file that compresses well\n`, at);
        return out;
      };
      try {
        await client.write(0, text(8 * MiB, 1));
        await client.write(16 * MiB, randomBytes(2 * MiB)); // does not compress: stored plain
        await client.write(30 * MiB + 512, text(MiB, 2)); // unaligned
        const at1 = await contents(srv.uri);
        const p1 = JSON.parse(await runAsyncOk(NBDD, ['backup', name, '--repo', repo, '--json', '--compress', ...(codec === 'zstd' ? [] : ['deflate'])], 120_000)) as Result & { fileBytes: number };
        expect(p1.kind).toBe('full');
        await client.write(MiB, text(MiB, 3));
        await client.writeZeroes(16 * MiB, MiB);
        const at2 = await contents(srv.uri);
        const p2 = JSON.parse(await runAsyncOk(NBDD, ['backup', name, '--repo', repo, '--json', '--compress', codec], 120_000)) as Result & { fileBytes: number };
        expect(p2.kind).toBe('incremental');

        expect(sha(await restored(repo, '0001'))).toBe(sha(at1));
        expect(sha(await restored(repo))).toBe(sha(at2));
        for (const [p, at] of [[p1, at1], [p2, at2]] as const) {
          const file = join(repo, p.file);
          const check = JSON.parse(runStatus('qemu-img', ['check', '--output=json', file]).stdout) as { 'compressed-clusters'?: number; leaks?: number; corruptions?: number };
          expect(check.corruptions ?? 0).toBe(0);
          expect(check.leaks ?? 0).toBe(0);
          expect(check['compressed-clusters'] ?? 0).toBeGreaterThanOrEqual(p === p1 ? 100 : 10);
          expect(run('qemu-img', ['info', file])).toContain(`compression type: ${codec === 'zstd' ? 'zstd' : 'zlib'}`);
          const want = join(dir.path, `want-${n++}.raw`);
          writeFileSync(want, at);
          expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', want, file]).stdout).toContain('Images are identical');
        }
        // 8 MiB of text compresses to well under a quarter; the random 2 MiB stays as it is.
        expect(p1.fileBytes).toBeLessThan(p1.bytesStored / 2);
        expect(p1.fileBytes).toBeGreaterThan(2 * MiB);
        const listed = JSON.parse(run(NBDD, ['backups', '--repo', repo, '--json'])) as { compression: string | null; fileBytes: number }[];
        expect(listed.map((p) => p.compression)).toEqual([codec, codec]);
        expect(run(NBDD, ['verify', '--repo', repo])).toMatch(/point 0002: ok/);
      } finally {
        await client.close();
        await srv.stop();
      }
    });
  }
});

describe('nbdd backup of a remote export', () => {
  it('qemu-nbd -B b0: full, then --bitmap b0 incremental; both restore exactly', async () => {
    const img = qcow2(32 * MiB);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x41 0 2M', img]);
    run('qemu-img', ['bitmap', '--add', img, 'b0']);
    const socket = join(dir.path, 'remote-qemu-nbd.sock');
    let peer = await startQemuNbdAt(socket, 'disk', ['-f', 'qcow2', '-B', 'b0', img]);
    const uri = peer.uri;
    const repo = join(dir.path, 'repo-remote');
    try {
      const at1 = await contents(uri);
      expect((await backupOf(uri, repo)).kind).toBe('full');
      await peer.stop();
      run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 8M 1M', '-c', 'write -P 0x43 30M 64k', img]);
      peer = await startQemuNbdAt(socket, 'disk', ['-f', 'qcow2', '-B', 'b0', img]);
      const at2 = await contents(peer.uri);
      const p2 = await backupOf(peer.uri, repo, ['--bitmap', 'b0']);
      expect(p2).toMatchObject({ kind: 'incremental', bytesStored: MiB + 64 * 1024 });
      expect(sha(await restored(repo, '0001'))).toBe(sha(at1));
      expect(sha(await restored(repo))).toBe(sha(at2));
    } finally {
      await peer.stop();
    }
  });
});

describe('nbdd verify and bad input', () => {
  it('verify fails on a flipped byte in a point data cluster, naming the point and the offset', async () => {
    const img = qcow2(16 * MiB);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-flip');
    try {
      await client.write(4 * MiB, randomBytes(MiB));
      await backupOf(name, repo);
    } finally {
      await client.close();
      await srv.stop();
    }
    expect(runStatus(NBDD, ['verify', '--repo', repo]).status).toBe(0);
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', join(repo, '0001-full.qcow2')])) as { start: number; data: boolean; offset?: number }[];
    const data = map.find((e) => e.data && e.offset !== undefined)!;
    const fd = openSync(join(repo, '0001-full.qcow2'), 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, data.offset! + 100);
    b[0] ^= 0x01;
    writeSync(fd, b, 0, 1, data.offset! + 100);
    closeSync(fd);
    const r = runStatus(NBDD, ['verify', '--repo', repo]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(new RegExp(`point 0001 \\(0001-full\\.qcow2\\): the stored \\d+-byte range at offset ${data.start} does not match`));
    const rr = runStatus(NBDD, ['restore', '--repo', repo, join(dir.path, 'flipped.raw')]);
    expect(rr.status).not.toBe(0);
    expect(rr.stderr).toMatch(/point 0001 .*does not match the manifest/);
  });

  it('a damaged block sums file fails verify, naming it; the next backup reads the blocks instead and is exact', async () => {
    const img = qcow2(32 * MiB);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-sums');
    try {
      await client.write(0, randomBytes(8 * MiB));
      await backupOf(name, repo);
      // Scattered changes: the second point sums its changed blocks only, the rest from 0001.sums.
      for (const o of [1, 3, 5, 7]) await client.write(o * MiB + 4096, randomBytes(4096));
      await backupOf(name, repo);
      expect(readdirSync(repo).filter((f) => f.endsWith('.sums')).sort()).toEqual(['0001.sums', '0002.sums']);
      expect(runStatus(NBDD, ['verify', '--repo', repo]).status).toBe(0);
      const sums = join(repo, '0001.sums');
      const bytes = readFileSync(sums);
      bytes[bytes.length - 1] ^= 0x40; // the last record's sum
      writeFileSync(sums, bytes);
      const r = runStatus(NBDD, ['verify', '--repo', repo]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/point 0001: its block sums file 0001\.sums is damaged/);
      await client.write(2 * MiB, randomBytes(4096));
      const now = await contents(srv.uri);
      const p3 = await backupOf(name, repo);
      expect(p3.kind).toBe('incremental');
      expect(sha(await restored(repo))).toBe(sha(now));
    } finally {
      await client.close();
      await srv.stop();
    }
  });

  it('a repo made before block sums and slice sums (its manifest rewritten to that form) verifies, restores, and takes an exact incremental', async () => {
    const img = qcow2(16 * MiB);
    const { srv, name, client } = await served(img);
    const repo = join(dir.path, 'repo-old');
    try {
      await client.write(MiB, randomBytes(3 * MiB + 1234));
      const disk1 = sha(await contents(srv.uri));
      await backupOf(name, repo);
      await client.write(9 * MiB + 512, randomBytes(70_000));
      const disk2 = sha(await contents(srv.uri));
      await backupOf(name, repo);
      // What the code before block sums wrote: no .sums files, no extentSums, and each stored
      // range summed as the SHA-256 of its bytes.
      const manifestPath = join(repo, 'manifest.json');
      const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as { points: Record<string, unknown>[] };
      for (const p of manifest.points) {
        expect(p.extentSums).toBe('slices');
        const own = await openQcow2(join(repo, p.file as string), { readOnly: true, openBacking: false });
        try {
          const extents = p.extents as [number, number, string | null][];
          for (const e of extents) if (e[2] !== null) e[2] = sha(await own.read(e[0], e[1]));
        } finally {
          await own.close();
        }
        rmSync(join(repo, p.sums as string));
        delete p.extentSums;
        delete p.sums;
        delete p.sumsSha256;
      }
      writeFileSync(manifestPath, JSON.stringify(manifest, null, 2));
      expect(runStatus(NBDD, ['verify', '--repo', repo]).status).toBe(0);
      expect(sha(await restored(repo, '0001'))).toBe(disk1);
      expect(sha(await restored(repo, '0002'))).toBe(disk2);
      // The old sums still catch a damaged range: flip a byte of 0002's stored data.
      const map = JSON.parse(run('qemu-img', ['map', '--output=json', join(repo, manifest.points[1]!.file as string)])) as { start: number; data: boolean; depth: number; offset?: number }[];
      const own = map.find((e) => e.data && e.depth === 0 && e.offset !== undefined)!;
      const fd = openSync(join(repo, manifest.points[1]!.file as string), 'r+');
      const byte = Buffer.alloc(1);
      readSync(fd, byte, 0, 1, own.offset!);
      writeSync(fd, Buffer.from([byte[0]! ^ 0x80]), 0, 1, own.offset!);
      const bad = runStatus(NBDD, ['verify', '--repo', repo]);
      writeSync(fd, byte, 0, 1, own.offset!);
      closeSync(fd);
      expect(bad.status).not.toBe(0);
      expect(bad.stderr).toMatch(/point 0002 .*does not match/);
      // The next backup builds on the old points (no block sums to take: it reads the blocks).
      await client.write(200_000, randomBytes(5000));
      const disk3 = sha(await contents(srv.uri));
      const p3 = await backupOf(name, repo);
      expect(p3.kind).toBe('incremental');
      expect(sha(await restored(repo))).toBe(disk3);
      expect(runStatus(NBDD, ['verify', '--repo', repo]).status).toBe(0);
    } finally {
      await client.close();
      await srv.stop();
    }
  });

  it('refuses a repo of another disk, a missing point, a directory that is not a repo and a source without a sidecar; nothing is touched', async () => {
    const small = qcow2(16 * MiB);
    const big = qcow2(32 * MiB);
    const a = await served(small);
    const repo = join(dir.path, 'repo-bad');
    try {
      await a.client.write(0, randomBytes(MiB));
      await backupOf(a.name, repo);
    } finally {
      await a.client.close();
      await a.srv.stop();
    }
    const snapshot = (): string => readdirSync(repo).sort().map((f) => `${f}:${fileSha(join(repo, f))}`).join(',');
    const before = snapshot();
    const b = await served(big);
    try {
      const other = runStatus(NBDD, ['backup', b.name, '--repo', repo]);
      expect(other.status).not.toBe(0);
      expect(other.stderr).toMatch(/is a repo of a 16777216-byte disk/);
    } finally {
      await b.client.close();
      await b.srv.stop();
    }
    const c = await served(small);
    try {
      const renamed = runStatus(NBDD, ['backup', c.name, '--repo', repo]);
      expect(renamed.status).not.toBe(0);
      expect(renamed.stderr).toMatch(/is a repo of 'bk-.*', not of 'bk-/);
    } finally {
      await c.client.close();
      await c.srv.stop();
    }
    expect(snapshot()).toBe(before);

    const missing = runStatus(NBDD, ['restore', '--repo', repo, '--point', '0042', join(dir.path, 'x.raw')]);
    expect(missing.status).not.toBe(0);
    expect(missing.stderr).toMatch(/no point '0042' \(points: 0001\)/);

    const notRepo = join(dir.path, 'not-a-repo');
    mkdirSync(notRepo);
    writeFileSync(join(notRepo, 'precious.txt'), 'keep me');
    const r = runStatus(NBDD, ['backup', 'nosuch', '--repo', notRepo]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/no nbdd sidecar for 'nosuch'.*NBD URI/);
    const srv = await serveNbdd(small);
    try {
      const nr = runStatus(NBDD, ['backup', srv.uri, '--repo', notRepo]);
      expect(nr.status).not.toBe(0);
      expect(nr.stderr).toMatch(/not an nbdd backup repo/);
    } finally {
      await srv.stop();
    }
    expect(readdirSync(notRepo)).toEqual(['precious.txt']);
    expect(readFileSync(join(notRepo, 'precious.txt'), 'utf8')).toBe('keep me');
    for (const out of [r.stderr, missing.stderr]) expect(out).not.toMatch(/\n\s+at /);
  });
});
