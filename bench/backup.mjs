#!/usr/bin/env node
/**
 * Backup throughput, in one run on the same files:
 *
 * - full: `nbdd backup NAME --repo R` of a served qcow2 (BENCH_SIZE virtual, BENCH_DATA of
 *   random data in 1 MiB runs spread over it) against `nbdcopy` of the same export (the sidecar's
 *   point-in-time export is what nbdd reads; nbdcopy reads the main export) into a new qcow2
 *   served by qemu-nbd (`nbdcopy SRC -- [ qemu-nbd -f qcow2 OUT ]`). Prints seconds, MiB/s of
 *   data and the ratio nbdcopy time / nbdd time (> 1: nbdd faster).
 * - incremental: after 1 % and then 10 % of the disk is rewritten in random 64 KiB blocks, the
 *   time of `nbdd backup` (incremental) against the full backup's, and the bytes it stored.
 * - compressed: a second served qcow2 holding BENCH_CDATA (default 512M) of compressible data
 *   (a tar of /usr/lib: binaries and text, as a system disk holds), `nbdd backup --compress`
 *   (zstd) against `qemu-img convert -c -O qcow2 -o compression_type=zstd` of the same export.
 *   Prints times, file sizes and the ratios qemu-img/nbdd.
 *
 * Needs root (the sidecar lives in /run/nbdd), `npm run build`, nbdcopy, qemu-img, qemu-nbd.
 * BENCH_SIZE (default 4G), BENCH_DATA (default 1G), BENCH_DIR (OS temp dir).
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const NBDD = resolve(import.meta.dirname, '../bin/nbdd');
const MiB = 1024 * 1024;
const parse = (s) => Number(/^(\d+)([KMG]?)$/i.exec(s)[1]) * { '': 1, K: 1024, M: MiB, G: 1024 * MiB }[/^(\d+)([KMG]?)$/i.exec(s)[2].toUpperCase()];
const SIZE = parse(process.env.BENCH_SIZE ?? '4G');
const DATA = parse(process.env.BENCH_DATA ?? '1G');
const CDATA = parse(process.env.BENCH_CDATA ?? '512M');
const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'nbdd-bench-backup-'));
const name = `bench-backup-${process.pid}`;

const run = (cmd, args) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * MiB });
const timed = (cmd, args) => {
  const t = process.hrtime.bigint();
  const out = run(cmd, args);
  return { seconds: Number(process.hrtime.bigint() - t) / 1e9, out };
};

async function main() {
  const img = join(dir, 'disk.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE)]);
  const socket = join(dir, 'nbdd.sock');
  const server = spawn(NBDD, ['serve', img, '--socket', socket, '--name', name], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
    const uri = `nbd+unix:///?socket=${socket}`;
    // Data: 1 MiB runs at evenly spread offsets, written with nbdcopy from a random file.
    const runs = DATA / MiB;
    const step = Math.floor(SIZE / runs / MiB) * MiB;
    const src = join(dir, 'run.bin');
    execFileSync('sh', ['-c', `head -c ${MiB} /dev/urandom > ${src}`]);
    const { openNbd } = await import('../dist/backends/nbd.js');
    const client = await openNbd(uri);
    const write = async (offsets, length) => {
      for (let i = 0; i < offsets.length; i += 16) await Promise.all(offsets.slice(i, i + 16).map((o) => client.write(o, randomBytes(length))));
      await client.flush();
    };
    await write(Array.from({ length: runs }, (_, i) => i * step), MiB);

    const repo = join(dir, 'repo');
    const full = timed(NBDD, ['backup', name, '--repo', repo, '--json']);
    const out = join(dir, 'nbdcopy.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', out, String(SIZE)]);
    const copy = timed('nbdcopy', ['--target-is-zero', uri, '--', '[', 'qemu-nbd', '-f', 'qcow2', out, ']']);
    const mibps = (s) => (DATA / MiB / s).toFixed(0);
    console.log(`disk ${SIZE / MiB} MiB, ${DATA / MiB} MiB of data`);
    console.log(`full backup   nbdd ${full.seconds.toFixed(2)} s (${mibps(full.seconds)} MiB/s)   nbdcopy→qcow2 ${copy.seconds.toFixed(2)} s (${mibps(copy.seconds)} MiB/s)   nbdcopy/nbdd ${(copy.seconds / full.seconds).toFixed(2)}`);

    for (const pct of [1, 10]) {
      const blocks = Math.floor((SIZE * pct) / 100 / (64 * 1024));
      const offsets = Array.from({ length: blocks }, () => Math.floor(Math.random() * (SIZE / (64 * 1024))) * 64 * 1024);
      await write(offsets, 64 * 1024);
      const inc = timed(NBDD, ['backup', name, '--repo', repo, '--json']);
      const r = JSON.parse(inc.out);
      console.log(`incremental ${String(pct).padStart(2)} %   ${inc.seconds.toFixed(2)} s, ${(r.bytesStored / MiB).toFixed(0)} MiB stored (${r.kind})   time/full ${(inc.seconds / full.seconds).toFixed(2)}`);
    }
    await client.close();
    await compressed();
  } finally {
    server.kill('SIGTERM');
    await new Promise((r) => server.once('exit', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

async function compressed() {
  const data = join(dir, 'usr.tar');
  execFileSync('sh', ['-c', `tar cf - /usr/lib 2>/dev/null | head -c ${CDATA} > ${data}`]);
  const img = join(dir, 'cdisk.qcow2');
  run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', data, img]);
  const cname = `${name}-c`;
  const socket = join(dir, 'cdisk.sock');
  const server = spawn(NBDD, ['serve', img, '--socket', socket, '--name', cname], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
    const nb = timed(NBDD, ['backup', cname, '--repo', join(dir, 'crepo'), '--json', '--compress']);
    const r = JSON.parse(nb.out);
    const out = join(dir, 'qemu-c.qcow2');
    const q = timed('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', `nbd+unix:///?socket=${socket}`, out]);
    const qBytes = Number(run('du', ['-B1', out]).split(/\s/)[0]);
    const mb = (b) => (b / MiB).toFixed(0);
    console.log(`compressed full backup (zstd), ${mb(CDATA)} MiB of /usr/lib tar`);
    console.log(`  nbdd --compress ${nb.seconds.toFixed(2)} s, file ${mb(r.fileBytes)} MiB   qemu-img convert -c ${q.seconds.toFixed(2)} s, file ${mb(qBytes)} MiB   time qemu-img/nbdd ${(q.seconds / nb.seconds).toFixed(2)}   size nbdd/qemu-img ${(r.fileBytes / qBytes).toFixed(3)}`);
  } finally {
    server.kill('SIGTERM');
    await new Promise((r) => server.once('exit', r));
  }
}

await main();
