#!/usr/bin/env node
/**
 * `npm run bench`: nbdd against qemu-nbd and nbdkit on the same image, in the same run, with fio's
 * `nbd` engine (libnbd) over a unix socket. Prints a table (or JSON with --json) of IOPS / MiB/s
 * per case and server, the ratio nbdd/peer, each server's peak RSS (VmHWM) and its CPU time per
 * request (all threads, from the end of the ramp to fio's exit; the least over the rounds).
 *
 * Method
 * - One image per image kind, made once per run in a temporary directory: `raw` is fallocated and
 *   then filled with non-zero data and fdatasync'ed, so reads hit real (page-cached) data rather
 *   than unwritten extents, and writes overwrite allocated blocks.
 * - Every cell (case × server × round) starts a fresh server, waits until its socket accepts, runs
 *   one fio job (one connection; `fio.jobs` jobs and connections if set), reads the server's VmHWM, and stops it with SIGTERM.
 * - Servers alternate inside each case (nbdd, qemu-nbd, nbdkit, nbdd, ...) for BENCH_ROUNDS rounds;
 *   the table shows the best round per server (the least disturbed by other load on a shared
 *   machine); JSON has every round.
 * - Same durability semantics for all three: page cache (buffered I/O), FLUSH = fdatasync.
 *   qemu-nbd: `--cache=writeback --aio=threads` (its defaults, spelled out); nbdkit: the `file`
 *   plugin with its default `cache=default`; nbdd: `serve` with its defaults (raw backend, node:fs).
 *   fio sends no FLUSH or FUA in these jobs.
 *
 * - `remote …` rows: each server proxies a remote nbdkit (plain or TLS-PSK, one or four connections
 *   upstream; see remoteVariants). Rows marked optIn run only when BENCH_CASES selects them.
 *
 * Environment: BENCH_RUNTIME seconds per cell (10), BENCH_RAMP seconds of warm-up (1), BENCH_SIZE
 * image size (1G), BENCH_ROUNDS (2), BENCH_SERVERS comma list (all), BENCH_CASES regular expression
 * on case names (all but optIn rows), BENCH_DIR for the images and sockets (the OS temp directory),
 * BENCH_BASELINE: another built nbdd checkout (a `git worktree` of the commit before a change) run
 * as `nbdd-base` beside nbdd in every nbdd row — before and after in one run, the nbdd/nbdd-base
 * column.
 * Flags: --json (JSON on stdout instead of the table), --save FILE (also write the JSON to FILE).
 * Progress goes to stderr.
 *
 * Adding a row: an entry in CASES ({name, image, servers, metric, fio: {rw, bs, iodepth, jobs?},
 * connections?, optIn?}); a new image kind in IMAGES; a new server in SERVERS (its argv for each
 * image format it can serve).
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir } from 'node:os';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchTools, connectionsTo, cpuSeconds, fioSide, fillWithData, firstLine, peakRssKiB, stopServer, waitForSocket } from './common.mjs';

const { fail, progress, run, envNumber, saveFile } = benchTools('bench');

const ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
const MiB = 1024 * 1024;

/* ------------------------------------------------------------------ cases */

/** What each row measures; `metric` picks the column shown (fio reports both). */
const CASES = [
  { name: 'raw 4k randread qd16', image: 'raw', servers: ['nbdd', 'qemu-nbd', 'nbdkit'], metric: 'iops', fio: { rw: 'randread', bs: '4k', iodepth: 16 } },
  { name: 'raw 4k randwrite qd16', image: 'raw', servers: ['nbdd', 'qemu-nbd', 'nbdkit'], metric: 'iops', fio: { rw: 'randwrite', bs: '4k', iodepth: 16 } },
  { name: 'raw 1M seqread qd8', image: 'raw', servers: ['nbdd', 'qemu-nbd', 'nbdkit'], metric: 'mibps', fio: { rw: 'read', bs: '1M', iodepth: 8 } },
  { name: 'raw 1M seqwrite qd8', image: 'raw', servers: ['nbdd', 'qemu-nbd', 'nbdkit'], metric: 'mibps', fio: { rw: 'write', bs: '1M', iodepth: 8 } },
  { name: 'qcow2 full 4k randread qd16', image: 'qcow2-full', servers: ['nbdd', 'qemu-nbd'], metric: 'iops', fio: { rw: 'randread', bs: '4k', iodepth: 16 } },
  { name: 'qcow2 full 4k randwrite qd16', image: 'qcow2-full', servers: ['nbdd', 'qemu-nbd'], metric: 'iops', fio: { rw: 'randwrite', bs: '4k', iodepth: 16 } },
  { name: 'qcow2 fresh 4k randwrite qd16', image: 'qcow2-fresh', servers: ['nbdd', 'qemu-nbd'], metric: 'iops', fio: { rw: 'randwrite', bs: '4k', iodepth: 16 } },
  { name: 'qcow2 full 1M seqread qd8', image: 'qcow2-full', servers: ['nbdd', 'qemu-nbd'], metric: 'mibps', fio: { rw: 'read', bs: '1M', iodepth: 8 } },
  { name: 'qcow2 fresh 1M seqwrite qd8', image: 'qcow2-fresh', servers: ['nbdd', 'qemu-nbd'], metric: 'mibps', fio: { rw: 'write', bs: '1M', iodepth: 8 } },
  // The local end of a remote export: each server proxies the same nbdkit (file plugin, a data-filled image).
  { name: 'remote 4k randread qd16', image: 'remote', servers: ['nbdd', 'qemu-nbd'], metric: 'iops', fio: { rw: 'randread', bs: '4k', iodepth: 16 } },
  { name: 'remote 4k randwrite qd16', image: 'remote', servers: ['nbdd', 'qemu-nbd'], metric: 'iops', fio: { rw: 'randwrite', bs: '4k', iodepth: 16 } },
  { name: 'remote 1M seqread qd8', image: 'remote', servers: ['nbdd', 'qemu-nbd'], metric: 'mibps', fio: { rw: 'read', bs: '1M', iodepth: 8 } },
  ...remoteVariants(),
];

/**
 * Opt-in remote rows (run only when BENCH_CASES selects them, e.g. BENCH_CASES=remote): over TLS
 * (`remote tls …`, PSK) and with 4 connections (`… 4conn* …`: nbdd `--connections 4` to the remote;
 * qemu-nbd 7.2's nbd driver has no multi-conn client and keeps its one connection; fio runs 4 jobs,
 * one connection each, so both servers get 4 clients). `connections` is what nbdd opens upstream.
 */
function remoteVariants() {
  const jobs = [
    { what: '4k randread', metric: 'iops', fio: { rw: 'randread', bs: '4k', iodepth: 16 } },
    { what: '4k randwrite', metric: 'iops', fio: { rw: 'randwrite', bs: '4k', iodepth: 16 } },
    { what: '1M seqread', metric: 'mibps', fio: { rw: 'read', bs: '1M', iodepth: 8 } },
  ];
  const rows = [];
  for (const [prefix, image, connections] of [['remote 4conn*', 'remote', 4], ['remote tls', 'remote-tls', 1], ['remote tls 4conn*', 'remote-tls', 4]]) {
    for (const j of jobs) {
      const qd = connections > 1 ? `${connections}x qd${j.fio.iodepth}` : `qd${j.fio.iodepth}`;
      rows.push({ name: `${prefix} ${j.what} ${qd}`, image, servers: ['nbdd', 'qemu-nbd'], metric: j.metric, connections, optIn: true, fio: { ...j.fio, jobs: connections } });
    }
  }
  return rows;
}

/** Printed under the table when a row of that kind ran. */
const NOTES = [
  { match: /4conn\*/, text: '4conn*: nbdd opens 4 connections to the remote (--connections 4); qemu-nbd has 1 (its nbd driver has no multi-conn); fio: 4 jobs, 1 connection each, qd per job' },
  { match: /^remote tls/, text: 'remote tls: the remote nbdkit runs --tls=require --tls-psk; fio to the proxy is plain' },
];

/**
 * Image kinds: create one in `dir` of `size` bytes, return its path and format. `fresh` kinds are
 * made again before every cell, so each server starts from the same empty image.
 */
const IMAGES = {
  raw: (dir, size) => {
    const path = join(dir, 'bench.raw');
    run('fallocate', ['-l', String(size), path]);
    fillWithData(path, size);
    return { path, format: 'raw' };
  },
  /** Every cluster allocated with data (converted from a data-filled raw image). */
  'qcow2-full': (dir, size) => {
    const raw = join(dir, 'bench-src.raw');
    run('fallocate', ['-l', String(size), raw]);
    fillWithData(raw, size);
    const path = join(dir, 'bench-full.qcow2');
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, path]);
    rmSync(raw);
    return { path, format: 'qcow2' };
  },
  /** A remote export: nbdkit serving a data-filled raw image, started once per run; servers proxy it. */
  remote: (dir, size) => {
    const socket = startRemote(dir, size, 'remote.sock', []);
    return { path: `nbd+unix:///?socket=${socket}`, format: 'raw', remoteSocket: socket };
  },
  /**
   * The same image from a second nbdkit that requires TLS with a pre-shared key (user `alice`, a
   * random 256-bit key in DIR/keys.psk, the file name qemu's tls-creds-psk looks for).
   */
  'remote-tls': (dir, size) => {
    const pskDir = join(dir, 'psk');
    mkdirSync(pskDir, { mode: 0o700, recursive: true });
    const pskFile = join(pskDir, 'keys.psk');
    writeFileSync(pskFile, `${PSK_USER}:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    const socket = startRemote(dir, size, 'remote-tls.sock', ['--tls=require', `--tls-psk=${pskFile}`]);
    const path = `nbds+unix:///?socket=${socket}&tls-psk-file=${pskFile}&tls-username=${PSK_USER}`;
    return { path, format: 'raw', remoteSocket: socket, tls: { pskDir, pskFile, username: PSK_USER } };
  },
  /** Empty: every write allocates. */
  'qcow2-fresh': (dir, size) => {
    const path = join(dir, 'bench-fresh.qcow2');
    rmSync(path, { force: true });
    run('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(size)]);
    return { path, format: 'qcow2', fresh: true };
  },
};

const PSK_USER = 'alice';

/** The data-filled raw image the remote nbdkit instances share (made once per run). */
let remoteRaw;
/** The remote nbdkit processes, stopped when the run ends (a live child would keep node from exiting). */
const remotes = [];

/**
 * Starts `nbdkit file` on the shared remote image (for the rest of the run) with `extra` options,
 * waits for its socket. The file plugin advertises multi-conn, which the 4conn rows need (without
 * it nbdd keeps one connection; runCell counts the connections and main warns on a mismatch).
 */
function startRemote(dir, size, name, extra) {
  if (!remoteRaw) {
    remoteRaw = join(dir, 'bench-remote.raw');
    run('fallocate', ['-l', String(size), remoteRaw]);
    fillWithData(remoteRaw, size);
  }
  const socket = join(dir, name);
  const child = spawn('nbdkit', ['-f', '-U', socket, ...extra, 'file', remoteRaw], { stdio: 'ignore' });
  remotes.push(child);
  process.on('exit', () => child.kill('SIGKILL'));
  for (let i = 0; i < 200 && !existsSync(socket); i++) spawnSync('sleep', ['0.05']);
  if (!existsSync(socket)) fail(`nbdkit ${extra.join(' ')} did not listen on ${socket}`);
  return socket;
}


/** Servers: `argv(image, socket, c)` for the formats they serve (c: the case); `check()` returns why not, or null. */
const SERVERS = {
  nbdd: {
    formats: ['raw', 'qcow2'],
    argv: (image, socket, c) => [
      join(ROOT, 'bin/nbdd'), 'serve', image.path, '--socket', socket, // through its first line: node with nbdd's flags
      ...(c.connections > 1 ? ['--connections', String(c.connections)] : []),
    ],
    check: () => {
      const build = spawnSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(ROOT, 'tsconfig.build.json')], { encoding: 'utf8' });
      if (build.status !== 0) return `build failed: ${build.stdout}${build.stderr}`;
      const help = spawnSync(process.execPath, [join(ROOT, 'bin/nbdd'), '--help'], { encoding: 'utf8' });
      return /^\s+serve\b/m.test(help.stdout) ? null : '`nbdd serve` is not available in this tree yet (git merge main)';
    },
    version: () => JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version,
  },
  'qemu-nbd': {
    formats: ['raw', 'qcow2'],
    // One connection to the remote whatever c.connections says (qemu 7.2 has no multi-conn client:
    // file.multi-conn is refused); -e lets fio's jobs connect side by side (the default is 1 client).
    argv: (image, socket, c) => [
      'qemu-nbd', '-t', '-k', socket,
      ...((c.fio.jobs ?? 1) > 1 ? ['-e', String(c.fio.jobs)] : []),
      ...(image.remoteSocket
        ? [
            ...(image.tls ? ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${image.tls.pskDir},username=${image.tls.username}`] : []),
            '--image-opts', `driver=raw,file.driver=nbd,file.path=${image.remoteSocket}${image.tls ? ',file.tls-creds=tls0' : ''}`,
          ]
        : ['-f', image.format, '--cache=writeback', '--aio=threads', image.path]),
    ],
    check: () => toolMissing('qemu-nbd', ['--version'], 'qemu-utils'),
    version: () => firstLine('qemu-nbd', ['--version']),
  },
  nbdkit: {
    formats: ['raw'],
    argv: (image, socket) => ['nbdkit', '-f', '-U', socket, 'file', image.path],
    check: () => toolMissing('nbdkit', ['--version'], 'nbdkit'),
    version: () => firstLine('nbdkit', ['--version']),
  },
};

const BASELINE = process.env.BENCH_BASELINE;
if (BASELINE) {
  SERVERS['nbdd-base'] = {
    formats: SERVERS.nbdd.formats,
    argv: (image, socket, c) => [join(BASELINE, 'bin/nbdd'), ...SERVERS.nbdd.argv(image, socket, c).slice(1)],
    check: () => (existsSync(join(BASELINE, 'dist/cli/main.js')) ? null : `BENCH_BASELINE=${BASELINE} holds no built nbdd (npx tsc -p tsconfig.build.json there)`),
    version: () => spawnSync('git', ['-C', BASELINE, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim() || 'unknown',
  };
}
/** A case's servers, the baseline right after nbdd when there is one. */
const serversOf = (c) => (BASELINE ? c.servers.flatMap((s) => (s === 'nbdd' ? ['nbdd', 'nbdd-base'] : [s])) : c.servers);

/* ------------------------------------------------------------------ settings */

function parseSize(text) {
  const m = /^(\d+)([KMG]?)$/i.exec(text.trim());
  if (!m) fail(`BENCH_SIZE=${text}: use e.g. 256M or 1G`);
  return Number(m[1]) * { '': 1, K: 1024, M: MiB, G: 1024 * MiB }[m[2].toUpperCase()];
}

const settings = {
  runtimeSeconds: envNumber('BENCH_RUNTIME', 10),
  rampSeconds: envNumber('BENCH_RAMP', 1),
  imageBytes: parseSize(process.env.BENCH_SIZE ?? '1G'),
  rounds: Math.max(1, Math.floor(envNumber('BENCH_ROUNDS', 2))),
  pick: 'best of rounds',
};
const serverFilter = process.env.BENCH_SERVERS ? process.env.BENCH_SERVERS.split(',').map((s) => s.trim()) : null;
const caseFilter = process.env.BENCH_CASES ? new RegExp(process.env.BENCH_CASES) : null;
const asJson = process.argv.includes('--json');

/* ------------------------------------------------------------------ helpers */

function toolMissing(cmd, args, pkg) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return r.status === 0 ? null : `${cmd} is missing (apt-get install ${pkg})`;
}






function runFio(socket, job, onStart) {
  const args = [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=nbd+unix:///?socket=${socket}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--numjobs=${job.jobs ?? 1}`,
    '--group_reporting=1',
    '--time_based=1',
    `--runtime=${settings.runtimeSeconds}`,
    `--ramp_time=${settings.rampSeconds}`,
    '--norandommap=1',
    '--randrepeat=0',
    '--output-format=json',
  ];
  return fioSide(args, job.rw, onStart).then((side) => ({
    iops: side.iops,
    ios: side.total_ios,
    mibps: side.bw_bytes / MiB,
    latMeanUs: side.clat_ns.mean / 1000,
    latP99Us: (side.clat_ns.percentile?.['99.000000'] ?? NaN) / 1000,
  }));
}

/**
 * One cell: fresh server, one fio run (c.fio.jobs jobs, 1 by default), its peak RSS and its CPU
 * time (all threads) per request measured, from the end of the ramp to fio's exit.
 */
async function runCell(serverName, image, c, dir) {
  const job = c.fio;
  const socket = join(dir, `${serverName}.sock`);
  rmSync(socket, { force: true });
  const [cmd, ...args] = SERVERS[serverName].argv(image, socket, c);
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const stderr = [];
  child.stderr.on('data', (d) => stderr.push(d.toString()));
  try {
    await waitForSocket(socket, child, stderr);
    let cpuAtRampEnd;
    let rampTimer;
    const result = await runFio(socket, job, () => {
      rampTimer = setTimeout(() => (cpuAtRampEnd = cpuSeconds(child.pid)), settings.rampSeconds * 1000);
    }).finally(() => clearTimeout(rampTimer));
    if (cpuAtRampEnd !== undefined && result.ios > 0) result.cpuUsPerIo = ((cpuSeconds(child.pid) - cpuAtRampEnd) * 1e6) / result.ios;
    result.rssKiB = peakRssKiB(child.pid);
    if (image.remoteSocket) result.remoteConnections = connectionsTo(image.remoteSocket);
    return result;
  } finally {
    await stopServer(child);
    rmSync(socket, { force: true });
  }
}

/* ------------------------------------------------------------------ report */

const fmt = (metric, v) => (v === undefined ? '—' : metric === 'iops' ? Math.round(v).toString() : v.toFixed(1));

function printTable(report) {
  const peers = report.servers.filter((s) => s !== 'nbdd');
  const head = ['case', 'metric', ...report.servers, ...peers.map((p) => `nbdd/${p}`)];
  const rows = report.cases.map((c) => [
    c.name,
    c.metric === 'iops' ? 'IOPS' : 'MiB/s',
    ...report.servers.map((s) => fmt(c.metric, c.results[s]?.best?.[c.metric])),
    ...peers.map((p) => (c.ratios[p] === undefined ? '—' : c.ratios[p].toFixed(2))),
  ]);
  const rss = ['peak RSS MiB', '', ...report.servers.map((s) => (report.peakRssKiB[s] ? (report.peakRssKiB[s] / 1024).toFixed(1) : '—')), ...peers.map(() => '')];
  const all = [head, ...rows, rss];
  const widths = head.map((_, i) => Math.max(...all.map((r) => r[i].length)));
  const line = (r) => r.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  const lines = [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line), line(rss)];
  // CPU per request is steadier than throughput on a shared host: the least over the rounds.
  const cpuHead = ['case', 'CPU µs/req', ...report.servers];
  const cpuRows = report.cases.map((c) => [
    c.name,
    '',
    ...report.servers.map((s) => (c.results[s]?.leastCpuUsPerIo === undefined ? '—' : c.results[s].leastCpuUsPerIo.toFixed(1))),
  ]);
  const cpuAll = [cpuHead, ...cpuRows];
  const cpuWidths = cpuHead.map((_, i) => Math.max(...cpuAll.map((r) => r[i].length)));
  const cpuLine = (r) => r.map((cell, i) => (i < 2 ? cell.padEnd(cpuWidths[i]) : cell.padStart(cpuWidths[i]))).join('  ');
  lines.push('', cpuLine(cpuHead), cpuWidths.map((w) => '-'.repeat(w)).join('  '), ...cpuRows.map(cpuLine));
  lines.push('', `${settings.runtimeSeconds} s per cell after ${settings.rampSeconds} s ramp, ${report.settings.imageMiB} MiB image, best of ${settings.rounds} rounds; fio ${report.versions.fio}`);
  for (const n of NOTES) if (report.cases.some((c) => n.match.test(c.name))) lines.push(n.text);
  for (const [s, why] of Object.entries(report.skipped)) lines.push(`${s}: skipped (${why})`);
  for (const w of report.warnings) lines.push(`warning: ${w}`);
  for (const e of report.errors) lines.push(`error: ${e}`);
  process.stdout.write(lines.join('\n') + '\n');
}

/* ------------------------------------------------------------------ main */

async function main() {
  if (!/\buri\b/.test(spawnSync('fio', ['--enghelp=nbd'], { encoding: 'utf8' }).stdout ?? '')) {
    fail('fio with the nbd engine is missing (apt-get install fio; it must be built with libnbd)');
  }
  const cases = CASES.filter((c) => (caseFilter ? caseFilter.test(c.name) : !c.optIn));
  const wanted = [...new Set(cases.flatMap(serversOf))].filter((s) => !serverFilter || serverFilter.includes(s));
  const skipped = {};
  const servers = wanted.filter((s) => {
    const why = SERVERS[s].check();
    if (why) {
      skipped[s] = why;
      progress(`${s}: skipped (${why})`);
    }
    return !why;
  });
  const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'nbdd-bench-'));
  const cleanup = () => rmSync(dir, { recursive: true, force: true });
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const report = {
    tool: 'nbdd bench/run.mjs',
    date: new Date().toISOString(),
    host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, kernel: release(), node: process.version },
    settings: { ...settings, imageMiB: settings.imageBytes / MiB },
    versions: { fio: firstLine('fio', ['--version']), ...Object.fromEntries(servers.map((s) => [s, SERVERS[s].version()])) },
    servers,
    skipped,
    errors: [],
    warnings: [],
    peakRssKiB: {},
    cases: [],
  };
  try {
    const images = {};
    for (const c of cases) {
      if (!images[c.image]) {
        progress(`making ${c.image} image of ${settings.imageBytes / MiB} MiB`);
        images[c.image] = IMAGES[c.image](dir, settings.imageBytes);
      }
      const image = images[c.image];
      const row = { name: c.name, image: c.image, metric: c.metric, fio: c.fio, connections: c.connections ?? 1, results: {}, ratios: {} };
      const here = serversOf(c).filter((s) => servers.includes(s) && SERVERS[s].formats.includes(image.format));
      for (let round = 1; round <= settings.rounds; round++) {
        for (const s of here) {
          progress(`${c.name}: ${s}, round ${round}`);
          const entry = (row.results[s] ??= { rounds: [] });
          try {
            if (image.fresh) images[c.image] = IMAGES[c.image](dir, settings.imageBytes);
            const r = await runCell(s, image, c, dir);
            entry.rounds.push(r);
            // nbdd opens c.connections (it falls back to 1 if the remote lacks multi-conn); qemu-nbd 1.
            const expected = s === 'nbdd' || s === 'nbdd-base' ? (c.connections ?? 1) : 1;
            if (r.remoteConnections !== undefined && r.remoteConnections !== expected) {
              report.warnings.push(`${c.name} / ${s} / round ${round}: ${r.remoteConnections} connections to the remote, expected ${expected}`);
            }
            if (!entry.best || r[c.metric] > entry.best[c.metric]) entry.best = r;
            if (r.cpuUsPerIo !== undefined) entry.leastCpuUsPerIo = Math.min(entry.leastCpuUsPerIo ?? Infinity, r.cpuUsPerIo);
            report.peakRssKiB[s] = Math.max(report.peakRssKiB[s] ?? 0, r.rssKiB ?? 0);
          } catch (err) {
            entry.rounds.push({ error: err.message });
            report.errors.push(`${c.name} / ${s} / round ${round}: ${err.message}`);
            progress(`  failed: ${err.message}`);
          }
        }
      }
      const mine = row.results.nbdd?.best?.[c.metric];
      for (const s of here) {
        const peer = row.results[s]?.best?.[c.metric];
        if (s !== 'nbdd' && mine !== undefined && peer) row.ratios[s] = mine / peer;
      }
      report.cases.push(row);
    }
  } finally {
    await Promise.all(remotes.map(stopServer));
    cleanup();
  }
  const json = JSON.stringify(report, null, 2) + '\n';
  if (saveFile) writeFileSync(saveFile, json);
  if (asJson) process.stdout.write(json);
  else printTable(report);
}

if (!existsSync(join(ROOT, 'package.json'))) fail(`cannot find the nbdd tree at ${ROOT}`);
main().catch((err) => fail(err.stack ?? String(err)));
