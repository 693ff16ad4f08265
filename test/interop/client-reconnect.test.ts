/**
 * The remote backend over a server that dies and comes back (src/nbd/client/reconnecting.ts):
 * nbdkit serving a file is SIGKILLed with requests in flight and restarted on the same socket.
 * Within --reconnect-delay the requests wait and complete, byte-verified; past it they fail with
 * EIO, and the backend serves again once the server is back; delay 0 fails at once. No sockets or
 * timers are left behind (open fds counted before and after).
 */
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openNbd } from '../../src/backends/nbd.js';
import { Errno, NbddError } from '../../src/core/errors.js';
import { freeze, requireTool, run, startNbdkitAt, tempDir, type Peer } from './nbd-peers.js';
import { NBDD, serveNbdd } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let n = 0;

beforeAll(() => {
  requireTool('nbdkit');
  dir = tempDir('nbdd-reconnect-');
});
afterAll(() => dir.remove());

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A 16 MiB file served by nbdkit on a socket that survives restarts of the server. */
async function fileServer(): Promise<{ socket: string; uri: string; start: () => Promise<Peer> }> {
  const file = join(dir.path, `disk-${n}.raw`);
  const socket = join(dir.path, `nbdkit-${n++}.sock`);
  run('truncate', ['-s', '16M', file]);
  return { socket, uri: `nbd+unix:///?socket=${socket}`, start: () => startNbdkitAt(socket, ['file', `file=${file}`]) };
}

describe('remote NBD backend: reconnect', () => {
  it('requests in flight when the server is killed wait, are sent again once it is back, and complete correctly', async () => {
    const srv = await fileServer();
    const fdsBefore = openFds();
    let peer = await srv.start();
    const b = await openNbd(srv.uri, { reconnectDelayMs: 20_000 });
    try {
      await b.write(0, Buffer.alloc(MiB, 0x11));
      await b.flush();
      await peer.kill();
      // Sent while the server is gone: they must wait, not fail.
      const pending = [b.read(0, MiB), b.write(MiB, Buffer.alloc(MiB, 0x22)), b.writeZeroes(2 * MiB, 65536), b.flush()];
      let settled = false;
      void Promise.allSettled(pending).then(() => (settled = true));
      await sleep(1500);
      expect(settled).toBe(false);
      expect(b.remoteState).toBe('reconnecting');
      peer = await srv.start();
      const [data] = await Promise.all(pending);
      expect((data as Buffer).equals(Buffer.alloc(MiB, 0x11))).toBe(true);
      expect(b.remoteState).toBe('connected');
      expect((await b.read(MiB, MiB)).equals(Buffer.alloc(MiB, 0x22))).toBe(true);
    } finally {
      await b.close();
      await peer.stop();
    }
    // The servers' stderr pipes close a moment after the processes are gone.
    for (let i = 0; i < 40 && openFds() > fdsBefore; i++) await sleep(50);
    expect(openFds()).toBe(fdsBefore);
  });

  it('past --reconnect-delay a request fails with EIO; the backend keeps trying and serves again when the server returns', async () => {
    const srv = await fileServer();
    let peer = await srv.start();
    const b = await openNbd(srv.uri, { reconnectDelayMs: 1000 });
    try {
      await b.write(0, Buffer.alloc(4096, 0x33));
      await peer.kill();
      const t0 = Date.now();
      const err = await b.read(0, 4096).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(NbddError);
      expect((err as NbddError).errno).toBe(Errno.EIO);
      expect((err as NbddError).message).toMatch(/unreachable for 1 s \(still reconnecting\)/);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
      peer = await srv.start();
      let back: Buffer | null = null;
      for (let i = 0; i < 100 && !back; i++) {
        back = await b.read(0, 4096).catch(() => null);
        if (!back) await sleep(100);
      }
      expect(back?.equals(Buffer.alloc(4096, 0x33))).toBe(true);
    } finally {
      await b.close();
      await peer.stop();
    }
  });

  it('with --reconnect-delay 0 a request on a lost connection fails at once with EIO', async () => {
    const srv = await fileServer();
    const peer = await srv.start();
    const b = await openNbd(srv.uri, { reconnectDelayMs: 0 });
    try {
      await peer.kill();
      const t0 = Date.now();
      await expect(b.read(0, 4096)).rejects.toMatchObject({ errno: Errno.EIO });
      expect(Date.now() - t0).toBeLessThan(1000);
    } finally {
      // Its last flush cannot reach the server: close says so.
      await expect(b.close()).rejects.toMatchObject({ errno: Errno.EIO });
    }
  });

  it('--request-timeout: a server that hangs has its connection dropped; the request is sent again on a new one and completes', async () => {
    const srv = await fileServer();
    const peer = await srv.start();
    const b = await openNbd(srv.uri, { reconnectDelayMs: 20_000, requestTimeoutMs: 1000 });
    try {
      await b.write(0, Buffer.alloc(65536, 0x44));
      await freeze(peer.pid);
      const t0 = Date.now();
      const read = b.read(0, 65536);
      await sleep(2500); // past the timeout: the connection was dropped, a new one waits on the stopped server
      process.kill(peer.pid, 'SIGCONT');
      expect((await read).equals(Buffer.alloc(65536, 0x44))).toBe(true);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(2400);
      expect(b.reconnects).toBeGreaterThanOrEqual(1);
    } finally {
      process.kill(peer.pid, 'SIGCONT');
      await b.close();
      await peer.stop();
    }
  });

  it('nbdd serve of a remote export: a client reading through nbdd while the remote restarts sees a slow disk, not an error', async () => {
    const srv = await fileServer();
    let peer = await srv.start();
    const name = `remote-${process.pid}-${n}`;
    const served = await serveNbdd(srv.uri, ['--reconnect-delay', '20', '--name', name]);
    const events = spawn(NBDD, ['events', name], { stdio: ['ignore', 'pipe', 'ignore'] });
    let eventLines = '';
    events.stdout.on('data', (d: Buffer) => (eventLines += d));
    try {
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 2M', served.uri]);
      await sleep(2000); // `nbdd events` has started and subscribed
      await peer.kill();
      const reader = spawn('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 2M', served.uri], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      reader.stdout.on('data', (d: Buffer) => (out += d));
      reader.stderr.on('data', (d: Buffer) => (out += d));
      const exited = new Promise<number | null>((r) => reader.on('exit', (code) => r(code)));
      await sleep(1500);
      expect(reader.exitCode).toBeNull(); // waiting, not failed
      peer = await srv.start();
      expect(await exited, out).toBe(0);
      expect(out).toMatch(/read 2097152\/2097152 bytes/);
      expect(served.stderr()).toMatch(/remote-lost: .*reconnecting/);
      expect(served.stderr()).toMatch(/remote-reconnected: /);
      const status = JSON.parse(run(NBDD, ['status', name, '--json'])) as { remote?: { uri: string; state: string; reconnects: number } };
      expect(status.remote).toEqual({ uri: srv.uri, state: 'connected', reconnects: 1 });
      for (let i = 0; i < 40 && !/remote-reconnected/.test(eventLines); i++) await sleep(50);
      expect(eventLines).toMatch(/remote-lost[\s\S]*remote-reconnected/);
    } finally {
      events.kill();
      await served.stop();
      await peer.stop();
    }
  });
});
