#!/usr/bin/env node
/**
 * `node bench/scale.mjs`: how nbdd's cost grows with image size, clients and dirty bitmaps, against
 * qemu-nbd in the same run. fio's `nbd` engine (libnbd, one connection per job) over a unix socket,
 * as in run.mjs. Prints one table per series with IOPS, the ratio nbdd/qemu-nbd, the server's CPU
 * time per request and its peak RSS (VmHWM); a memory table sums up RSS against size and clients.
 *
 * Method
 * - Every cell (series × point × server × round) starts a fresh server, waits until its socket
 *   accepts, runs one fio job (time based, BENCH_RAMP s of warm-up then BENCH_RUNTIME s measured,
 *   `norandommap`), reads the server's VmHWM and CPU time (utime+stime of all threads from
 *   /proc/PID/stat, sampled at the end of the ramp and when fio exits, divided by fio's request
 *   count), and stops it with SIGTERM. Servers alternate inside each point for BENCH_ROUNDS rounds;
 *   tables show the best round per server.
 * - Same settings as run.mjs: `nbdd serve IMAGE --socket S` (defaults), `qemu-nbd -t -k S -f FMT
 *   --cache=writeback --aio=threads` (+ `-e N` for N clients). Page cache, no FLUSH/FUA in the jobs.
 * - size: sparse qcow2 (qemu-img create, 64 KiB clusters) of 1 GiB, 64 GiB, 1 TiB. randwrite: 4k
 *   qd16 over the whole image on a fresh image per cell (every write allocates a cluster, at 1 TiB
 *   most also an L2 table). randread: 4k qd16 over the whole image on one image per size, shared by
 *   both servers, made beforehand by 32768 random 4k writes (fixed seed, through qemu-nbd) spread
 *   over the whole image — allocated and unallocated clusters mixed (the table gives the allocated
 *   share), every L2 table of the image present.
 * - clients: 1, 4, 16 fio jobs (each its own NBD connection, counted from /proc/net/unix in the
 *   middle of the run), 4k randread qd16 per job, on a 1 GiB raw image filled with data and a
 *   1 GiB qcow2 with every cluster allocated (converted from that raw image).
 * - bitmaps: 0, 1, 8, 64 persistent dirty bitmaps (64 KiB granularity), added to a 1 GiB qcow2
 *   with `qemu-img bitmap --add` before the server starts; both nbdd and qemu-nbd load them and
 *   keep them enabled. 4k randwrite qd16, three states per cell: `fresh` (new empty image: every
 *   write allocates and dirties new bits), `allocated` (every cluster allocated, bits clean: the
 *   cost of first-touch bits alone), `steady` (allocated and every bit already dirty: a 1M
 *   sequential write over the whole image through the same server, not measured, precedes the job).
 *   After each cell the image is opened read-only by `nbdd serve --name` and `nbdd bitmap list`
 *   tells how many bitmaps are enabled and how much each holds dirty (the check column).
 *
 * Environment: BENCH_RUNTIME seconds per cell (5), BENCH_RAMP seconds of warm-up (1), BENCH_ROUNDS
 * (1), BENCH_SERIES comma list of size,clients,bitmaps (all), BENCH_BITMAP_COUNTS comma list of
 * 0,1,8,64 and BENCH_BITMAP_STATES of fresh,allocated,steady (all), BENCH_SIZES comma list of
 * 1G,64G,1T (all), BENCH_SERVERS comma list of
 * nbdd,qemu-nbd (both), BENCH_DIR for images and sockets (the OS temp directory; a disk, so the
 * bitmaps' fdatasync costs what it costs on a disk — tmpfs would make it free). BENCH_BASELINE:
 * another built nbdd checkout (a `git worktree` of the commit before a change) run as a third
 * server, `nbdd-base`, alternating with the others: a before/after table joins the report.
 * Flags: --save FILE writes every cell as JSON. Progress goes to stderr. Needs `npm run build`.
 * About 8 minutes with the defaults on 2 cores.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, fdatasyncSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchTools, connectionsTo, cpuSeconds, fioSide, fillWithData, firstLine, peakRssKiB, stopServer, waitForSocket } from './common.mjs';

const { fail, progress, run, envNumber, saveFile } = benchTools('scale');

const ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
const NBDD = join(ROOT, 'bin/nbdd');
const BASELINE = process.env.BENCH_BASELINE;
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/* ------------------------------------------------------------------ settings */

function envList(name, all) {
  const raw = process.env[name];
  if (!raw) return all;
  const list = raw.split(',').map((s) => s.trim()).filter(Boolean);
  for (const s of list) if (!all.includes(s)) fail(`${name}: unknown ${s} (choose from ${all.join(',')})`);
  return list;
}

const settings = {
  runtimeSeconds: envNumber('BENCH_RUNTIME', 5),
  rampSeconds: envNumber('BENCH_RAMP', 1),
  rounds: Math.max(1, Math.floor(envNumber('BENCH_ROUNDS', 1))),
  series: envList('BENCH_SERIES', ['size', 'clients', 'bitmaps']),
  servers: envList('BENCH_SERVERS', BASELINE ? ['nbdd', 'nbdd-base', 'qemu-nbd'] : ['nbdd', 'qemu-nbd']),
};

const SIZE_KEYS = envList('BENCH_SIZES', ['1G', '64G', '1T']);
const SIZES = [['1G', '1 GiB', GiB], ['64G', '64 GiB', 64 * GiB], ['1T', '1 TiB', 1024 * GiB]].filter(([k]) => SIZE_KEYS.includes(k)).map(([, label, size]) => [label, size]);
const CLIENTS = [1, 4, 16];
const BITMAPS = envList('BENCH_BITMAP_COUNTS', ['0', '1', '8', '64']).map(Number);
const BITMAP_STATES = envList('BENCH_BITMAP_STATES', ['fresh', 'allocated', 'steady']);
/** Random 4k writes that make each size's read image (fixed seed): 128 MiB of data. */
const READ_IMAGE_WRITES = 32768;
const RANDREAD = { rw: 'randread', bs: '4k', iodepth: 16 };
const RANDWRITE = { rw: 'randwrite', bs: '4k', iodepth: 16 };

/* ------------------------------------------------------------------ helpers */



function syncFile(path) {
  const fd = openSync(path, 'r+');
  try {
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function newQcow2(path, size, bitmaps = 0) {
  rmSync(path, { force: true });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(size)]);
  addBitmaps(path, bitmaps);
}

function addBitmaps(path, count) {
  for (let i = 0; i < count; i++) run('qemu-img', ['bitmap', '--add', path, `b${i}`]);
}

/** Share of the virtual size that `qemu-img map` reports as data. */
function allocatedShare(path, size) {
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', path]));
  return map.filter((e) => e.data).reduce((sum, e) => sum + e.length, 0) / size;
}






/** Live servers, killed if the run dies (a live child would keep node from exiting). */
const live = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

async function startServer(argv, socket) {
  rmSync(socket, { force: true });
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(child);
  child.once('exit', () => live.delete(child));
  const stderr = [];
  child.stderr.on('data', (d) => stderr.push(d.toString()));
  try {
    await waitForSocket(socket, child, stderr);
  } catch (err) {
    await stopServer(child);
    throw err;
  }
  return child;
}

const SERVERS = {
  nbdd: (image, socket) => [NBDD, 'serve', image.path, '--socket', socket], // through its first line: node with nbdd's flags
  'nbdd-base': (image, socket) => [join(BASELINE ?? fail('nbdd-base needs BENCH_BASELINE'), 'bin/nbdd'), 'serve', image.path, '--socket', socket],
  'qemu-nbd': (image, socket, clients) => [
    'qemu-nbd', '-t', '-k', socket, ...(clients > 1 ? ['-e', String(clients)] : []),
    '-f', image.format, '--cache=writeback', '--aio=threads', image.path,
  ],
};

/**
 * One fio run. `job`: {rw, bs, iodepth, jobs?, extra?}; time based unless `job.untimed`.
 * `onRampEnd` is called once the ramp is over (measured runs only).
 */
function runFio(socket, job, onRampEnd) {
  const args = [
    '--name=scale', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`,
    `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`, `--numjobs=${job.jobs ?? 1}`,
    '--group_reporting=1', '--norandommap=1', '--output-format=json',
    ...(job.untimed ? [] : ['--time_based=1', `--runtime=${settings.runtimeSeconds}`, `--ramp_time=${settings.rampSeconds}`, '--randrepeat=0']),
    ...(job.extra ?? []),
  ];
  let timer;
  const started = onRampEnd && (() => (timer = setTimeout(onRampEnd, settings.rampSeconds * 1000 + 100)));
  return fioSide(args, job.rw, started)
    .finally(() => clearTimeout(timer))
    .then((side) => ({ iops: side.iops, ios: side.total_ios, latP99Us: (side.clat_ns.percentile?.['99.000000'] ?? NaN) / 1000 }));
}

/**
 * One cell: fresh server on `image`, optional unmeasured `prefill` fio job, the measured job; its
 * IOPS, CPU per request, VmHWM and the client connections seen half way through.
 */
async function runCell(server, image, job, dir, prefill) {
  const socket = join(dir, `${server}.sock`);
  const child = await startServer(SERVERS[server](image, socket, job.jobs ?? 1), socket);
  try {
    if (prefill) await runFio(socket, prefill);
    let cpuAtRampEnd;
    let clients;
    const result = await runFio(socket, job, () => {
      cpuAtRampEnd = cpuSeconds(child.pid);
      setTimeout(() => (clients = connectionsTo(socket)), (settings.runtimeSeconds * 1000) / 2);
    });
    const cpu = cpuSeconds(child.pid) - (cpuAtRampEnd ?? 0);
    return { ...result, cpuUsPerIo: (cpu * 1e6) / result.ios, rssKiB: peakRssKiB(child.pid), clients };
  } finally {
    await stopServer(child);
    rmSync(socket, { force: true });
  }
}

/**
 * Opens `path` read-only with `nbdd serve --name` and lists its bitmaps: how many are enabled, the
 * least any of them holds dirty (bytes).
 */
async function bitmapCheck(path, dir) {
  const name = `scale-${process.pid}`;
  const socket = join(dir, 'check.sock');
  const child = await startServer([NBDD, 'serve', path, '-r', '--socket', socket, '--name', name], socket);
  try {
    const list = JSON.parse(run(process.execPath, [NBDD, 'bitmap', 'list', name, '--json']));
    return { count: list.length, enabled: list.filter((b) => b.enabled).length, minDirty: Math.min(...list.map((b) => b.dirtyBytes)) };
  } finally {
    await stopServer(child);
  }
}

/**
 * Runs `cell(server, round)` for every server, alternating, BENCH_ROUNDS times; returns
 * {server: {best, rounds}} (best by IOPS). A failed cell is recorded and the run goes on.
 */
async function points(label, cell, report) {
  const out = {};
  for (let round = 1; round <= settings.rounds; round++) {
    for (const s of settings.servers) {
      progress(`${label}: ${s}, round ${round}`);
      const entry = (out[s] ??= { rounds: [] });
      try {
        const r = await cell(s, round);
        entry.rounds.push(r);
        if (!entry.best || r.iops > entry.best.iops) entry.best = r;
      } catch (err) {
        entry.rounds.push({ error: err.message });
        report.errors.push(`${label} / ${s} / round ${round}: ${err.message}`);
        progress(`  failed: ${err.message}`);
      }
    }
  }
  return out;
}

/* ------------------------------------------------------------------ series */

async function sizeSeries(dir, report) {
  const rows = [];
  for (const [label, size] of SIZES) {
    const fresh = join(dir, 'size-fresh.qcow2');
    const write = await points(`size ${label} randwrite`, async (s) => {
      newQcow2(fresh, size);
      return runCell(s, { path: fresh, format: 'qcow2' }, RANDWRITE, dir);
    }, report);
    rmSync(fresh, { force: true });

    progress(`size ${label}: making the read image (${READ_IMAGE_WRITES} random 4k writes through qemu-nbd)`);
    const readImage = { path: join(dir, 'size-read.qcow2'), format: 'qcow2' };
    newQcow2(readImage.path, size);
    const socket = join(dir, 'prep.sock');
    const prep = await startServer(SERVERS['qemu-nbd'](readImage, socket, 1), socket);
    await runFio(socket, { ...RANDWRITE, untimed: true, extra: [`--io_size=${READ_IMAGE_WRITES * 4 * KiB}`, '--randrepeat=1', '--randseed=4242'] }).finally(() => stopServer(prep));
    const allocated = allocatedShare(readImage.path, size);
    const read = await points(`size ${label} randread`, (s) => runCell(s, readImage, RANDREAD, dir), report);
    rmSync(readImage.path, { force: true });
    rows.push({ size: label, bytes: size, allocated, randwrite: write, randread: read });
  }
  return rows;
}

async function clientsSeries(dir, report) {
  progress('clients: making the 1 GiB raw (data) and qcow2 (every cluster allocated) images');
  const raw = { path: join(dir, 'clients.raw'), format: 'raw' };
  run('fallocate', ['-l', String(GiB), raw.path]);
  fillWithData(raw.path, GiB);
  const qcow2 = { path: join(dir, 'clients.qcow2'), format: 'qcow2' };
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw.path, qcow2.path]);
  const rows = [];
  for (const image of [raw, qcow2]) {
    for (const clients of CLIENTS) {
      const job = { ...RANDREAD, jobs: clients };
      const results = await points(`clients ${image.format} ${clients}`, (s) => runCell(s, image, job, dir), report);
      rows.push({ image: image.format, clients, results });
    }
  }
  rmSync(raw.path);
  rmSync(qcow2.path);
  return rows;
}

async function bitmapsSeries(dir, report) {
  progress('bitmaps: making a 1 GiB qcow2 with every cluster allocated');
  const full = join(dir, 'bitmaps-full.qcow2');
  const src = join(dir, 'bitmaps-src.raw');
  run('fallocate', ['-l', String(GiB), src]);
  fillWithData(src, GiB);
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src, full]);
  rmSync(src);
  const image = { path: join(dir, 'bitmaps.qcow2'), format: 'qcow2' };
  // --end_fsync: FLUSH at the end, so the prefill's dirty pages are not written back during the job.
  const prefill = { rw: 'write', bs: '1M', iodepth: 8, untimed: true, extra: ['--end_fsync=1'] };
  const rows = [];
  for (const state of BITMAP_STATES) {
    for (const count of BITMAPS) {
      const results = await points(`bitmaps ${state} ${count}`, async (s) => {
        if (state === 'fresh') newQcow2(image.path, GiB, count);
        else {
          copyFileSync(full, image.path);
          syncFile(image.path);
          addBitmaps(image.path, count);
        }
        const r = await runCell(s, image, RANDWRITE, dir, state === 'steady' ? prefill : undefined);
        if (count > 0) r.check = await bitmapCheck(image.path, dir);
        return r;
      }, report);
      rows.push({ state, bitmaps: count, results });
    }
  }
  rmSync(image.path, { force: true });
  rmSync(full);
  return rows;
}

/* ------------------------------------------------------------------ report */

const iops = (r) => (r?.best ? Math.round(r.best.iops).toString() : '—');
const ratio = (a, b) => (a?.best && b?.best ? (a.best.iops / b.best.iops).toFixed(2) : '—');
const cpuUs = (r) => (r?.best ? r.best.cpuUsPerIo.toFixed(1) : '—');
const rssMiB = (r) => (r?.best?.rssKiB ? (r.best.rssKiB / 1024).toFixed(1) : '—');

function table(title, head, rows) {
  const all = [head, ...rows];
  const widths = head.map((_, i) => Math.max(...all.map((r) => String(r[i]).length)));
  const line = (r) => r.map((cell, i) => (i === 0 ? String(cell).padEnd(widths[i]) : String(cell).padStart(widths[i]))).join('  ');
  return [title, '', line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line), ''].join('\n');
}

/** The columns every server-pair table has: IOPS each, nbdd/qemu-nbd, CPU µs per request, RSS. */
const pairHead = ['nbdd IOPS', 'qemu-nbd IOPS', 'nbdd/qemu', 'nbdd µs CPU/io', 'qemu µs CPU/io', 'nbdd RSS MiB', 'qemu RSS MiB'];
const pairCells = (r) => [iops(r.nbdd), iops(r['qemu-nbd']), ratio(r.nbdd, r['qemu-nbd']), cpuUs(r.nbdd), cpuUs(r['qemu-nbd']), rssMiB(r.nbdd), rssMiB(r['qemu-nbd'])];

function render(report) {
  const out = [];
  const { size, clients, bitmaps } = report.series;
  if (size) {
    out.push(table('size: 4k randwrite qd16 over the whole image, fresh sparse qcow2 per cell', ['image', ...pairHead], size.map((r) => [r.size, ...pairCells(r.randwrite)])));
    out.push(table(`size: 4k randread qd16 over the whole image, after ${READ_IMAGE_WRITES} random 4k writes`, ['image', 'allocated', ...pairHead], size.map((r) => [r.size, `${(r.allocated * 100).toFixed(2)} %`, ...pairCells(r.randread)])));
  }
  if (clients) {
    out.push(table('clients: 4k randread qd16 per client (fio job = NBD connection), 1 GiB image', ['image', 'clients', 'seen', ...pairHead],
      clients.map((r) => [r.image, r.clients, settings.servers.map((s) => r.results[s]?.best?.clients ?? '—').join('/'), ...pairCells(r.results)])));
  }
  if (bitmaps) {
    const base = Object.fromEntries(bitmaps.filter((r) => r.bitmaps === 0).map((r) => [r.state, r.results]));
    const check = (r) => {
      const c = r?.best?.check;
      return c ? `${c.enabled}/${c.count} on, ${(c.minDirty / MiB).toFixed(0)}M` : '—';
    };
    out.push(table('bitmaps: 4k randwrite qd16, 1 GiB qcow2, N persistent bitmaps (64 KiB granularity)',
      ['state', 'bitmaps', 'nbdd IOPS', 'nbdd vs 0', 'qemu-nbd IOPS', 'qemu vs 0', 'nbdd/qemu', 'nbdd µs CPU/io', 'qemu µs CPU/io', 'nbdd check', 'qemu check'],
      bitmaps.map((r) => [r.state, r.bitmaps, iops(r.results.nbdd), ratio(r.results.nbdd, base[r.state]?.nbdd), iops(r.results['qemu-nbd']), ratio(r.results['qemu-nbd'], base[r.state]?.['qemu-nbd']),
        ratio(r.results.nbdd, r.results['qemu-nbd']), cpuUs(r.results.nbdd), cpuUs(r.results['qemu-nbd']), check(r.results.nbdd), check(r.results['qemu-nbd'])])));
    out.push('check: after the cell, bitmaps enabled / in the image, and the least dirty bytes of any of them (nbdd bitmap list)\n');
  }
  if (BASELINE && (size || clients)) {
    const cells = (r) => [iops(r.nbdd), iops(r['nbdd-base']), ratio(r.nbdd, r['nbdd-base']), cpuUs(r.nbdd), cpuUs(r['nbdd-base']), rssMiB(r.nbdd), rssMiB(r['nbdd-base'])];
    const rows = [
      ...(size ?? []).flatMap((r) => [[`qcow2 ${r.size}, randwrite`, ...cells(r.randwrite)], [`qcow2 ${r.size}, randread`, ...cells(r.randread)]]),
      ...(clients ?? []).map((r) => [`${r.image} 1 GiB, ${r.clients} client${r.clients > 1 ? 's' : ''}`, ...cells(r.results)]),
    ];
    out.push(table(`before/after: nbdd against the baseline in ${BASELINE}`, ['cell', 'nbdd IOPS', 'base IOPS', 'nbdd/base', 'nbdd µs CPU/io', 'base µs CPU/io', 'nbdd RSS MiB', 'base RSS MiB'], rows));
  }
  if (size || clients) {
    const peak = (results) => settings.servers.map((s) => rssMiB(results[s]));
    const rows = [
      ...(size ?? []).flatMap((r) => [[`qcow2 ${r.size}, randwrite`, ...peak(r.randwrite)], [`qcow2 ${r.size}, randread`, ...peak(r.randread)]]),
      ...(clients ?? []).map((r) => [`${r.image} 1 GiB, ${r.clients} client${r.clients > 1 ? 's' : ''}`, ...peak(r.results)]),
    ];
    out.push(table('memory: peak RSS (VmHWM, MiB) of the best round', ['cell', ...settings.servers], rows));
  }
  out.push(`${settings.runtimeSeconds} s per cell after ${settings.rampSeconds} s ramp, best of ${settings.rounds} round(s); ${report.versions.fio}, ${report.versions['qemu-nbd']}, nbdd ${report.versions.nbdd}, node ${process.version}, ${report.host.cpus} CPUs`);
  for (const e of report.errors) out.push(`error: ${e}`);
  return out.join('\n') + '\n';
}

/* ------------------------------------------------------------------ main */

async function main() {
  if (!/\buri\b/.test(spawnSync('fio', ['--enghelp=nbd'], { encoding: 'utf8' }).stdout ?? '')) fail('fio with the nbd engine is missing');
  if (!existsSync(join(ROOT, 'dist/cli/main.js'))) fail('run `npm run build` first');
  for (const tool of ['qemu-img', 'qemu-nbd']) if (spawnSync(tool, ['--version']).status !== 0) fail(`${tool} is missing (apt-get install qemu-utils)`);
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'nbdd-scale-'));
  process.once('SIGINT', () => {
    rmSync(dir, { recursive: true, force: true });
    process.exit(130);
  });
  const report = {
    tool: 'nbdd bench/scale.mjs',
    date: new Date().toISOString(),
    host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, kernel: release(), node: process.version },
    settings,
    versions: {
      fio: firstLine('fio', ['--version']),
      'qemu-nbd': firstLine('qemu-nbd', ['--version']),
      nbdd: JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version,
    },
    errors: [],
    series: {},
  };
  const started = Date.now();
  try {
    if (settings.series.includes('size')) report.series.size = await sizeSeries(dir, report);
    if (settings.series.includes('clients')) report.series.clients = await clientsSeries(dir, report);
    if (settings.series.includes('bitmaps')) report.series.bitmaps = await bitmapsSeries(dir, report);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  report.seconds = Math.round((Date.now() - started) / 1000);
  progress(`done in ${report.seconds} s`);
  if (saveFile) writeFileSync(saveFile, JSON.stringify(report, null, 2) + '\n');
  process.stdout.write(render(report));
}

main().catch((err) => fail(err.stack ?? String(err)));
