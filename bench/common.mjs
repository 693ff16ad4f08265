/**
 * What the benchmarks share (run.mjs, scale.mjs): starting and stopping a server, waiting for its
 * socket, reading its peak memory and connections from /proc, filling an image with data.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, fdatasyncSync, openSync, readFileSync, writeSync } from 'node:fs';
import net from 'node:net';

const MiB = 1024 * 1024;

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
