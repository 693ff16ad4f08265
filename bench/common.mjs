/**
 * What the benchmarks share (run.mjs, scale.mjs): messages, commands and `--save`, starting and
 * stopping a server, waiting for its socket, reading its peak memory and connections from /proc,
 * filling an image with data.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, fdatasyncSync, openSync, readFileSync, writeSync } from 'node:fs';
import net from 'node:net';

const MiB = 1024 * 1024;

/**
 * One benchmark's helpers, its messages on stderr prefixed `NAME: `: `fail` (and exit 1),
 * `progress`, `run` (a command's stdout, or `fail` naming it), `envNumber` (a variable's
 * non-negative number, or the fallback when unset) and `saveFile` (`--save FILE`).
 */
export function benchTools(name) {
  const fail = (message) => {
    process.stderr.write(`${name}: ${message}\n`);
    process.exit(1);
  };
  const progress = (message) => process.stderr.write(`${name}: ${message}\n`);
  const run = (cmd, args) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 256 * MiB });
    if (r.status !== 0) fail(`${cmd} ${args.join(' ')} failed: ${r.error?.message ?? r.stderr}`);
    return r.stdout;
  };
  const envNumber = (variable, fallback) => {
    const raw = process.env[variable];
    if (raw === undefined || raw === '') return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value) || value < 0) fail(`${variable}=${raw} is not a number`);
    return value;
  };
  const saveIndex = process.argv.indexOf('--save');
  const saveFile = saveIndex > 0 ? process.argv[saveIndex + 1] : undefined;
  if (saveIndex > 0 && !saveFile) fail('--save needs a file name');
  return { fail, progress, run, envNumber, saveFile };
}

/**
 * Runs fio with `args` (which ask for `--output-format=json`) and resolves with the first job's
 * read or write side (`rw` says which). `onStart` runs when fio has started.
 */
export function fioSide(args, rw, onStart) {
  return new Promise((resolve, reject) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    onStart?.();
    const out = [];
    const err = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => err.push(d));
    child.once('error', reject);
    child.once('exit', (code) => {
      const text = Buffer.concat(out).toString();
      const start = text.indexOf('{'); // the nbd engine prints "fio: connected to NBD server" first
      if (code !== 0 || start < 0) return reject(new Error(`fio exited ${code}: ${Buffer.concat(err).toString().trim()}`));
      const j = JSON.parse(text.slice(start)).jobs[0];
      if (j.error) return reject(new Error(`fio job error ${j.error}`));
      resolve(rw.includes('read') ? j.read : j.write);
    });
  });
}

export function firstLine(cmd, args) {
  return spawnSync(cmd, args, { encoding: 'utf8' }).stdout.split('\n')[0].trim();
}

/** Writes a non-zero pattern over the whole file (1 MiB at a time) and makes it durable. */
export function fillWithData(path, size) {
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < chunk.length; i += 8) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  const fd = openSync(path, 'r+');
  try {
    for (let at = 0; at < size; at += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, size - at), at);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Resolves once `socket` accepts a connection; rejects if the server exits or 30 s pass. */
export function waitForSocket(socket, child, stderr) {
  const deadline = Date.now() + 30_000;
  return new Promise((resolve, reject) => {
    const onExit = (code) => reject(new Error(`server exited (${code}) before listening: ${stderr.join('').trim()}`));
    child.once('exit', onExit);
    const attempt = () => {
      if (Date.now() > deadline) return reject(new Error(`server did not listen on ${socket} within 30 s`));
      const conn = net.createConnection(socket);
      conn.once('connect', () => {
        conn.destroy();
        child.off('exit', onExit);
        resolve();
      });
      conn.once('error', () => setTimeout(attempt, 50));
    };
    attempt();
  });
}

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100;

/** utime + stime of every thread of a live process, in seconds. */
export function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** Peak resident set (VmHWM) of a live process, in KiB. */
export function peakRssKiB(pid) {
  const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : null;
}

/** SIGTERM, then SIGKILL after 10 s; resolves with how it ended. */
export function stopServer(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve('already exited');
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve(signal ?? `exit ${code}`);
    });
    child.kill('SIGTERM');
  });
}

/** Connected sockets the server end of unix socket `path` holds (from /proc/net/unix; state 03). */
export function connectionsTo(path) {
  return readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .filter((line) => {
      const f = line.trim().split(/\s+/);
      return f[5] === '03' && f[7] === path;
    }).length;
}
