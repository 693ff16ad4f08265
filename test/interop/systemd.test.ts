/**
 * systemd integration without a running systemd: the units `nbdd install-systemd` writes pass
 * `systemd-analyze verify`; `nbdd serve` sends READY=1 to a real `$NOTIFY_SOCKET` datagram socket
 * only once its socket serves, STOPPING=1 when told to stop; and it serves a socket handed over by
 * `systemd-socket-activate` (LISTEN_FDS). The attach side of READY=1 runs in the kernel tier.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NODE_FLAGS } from '../../src/core/node-flags.js';
import { listenFds, sdNotify } from '../../src/sys/systemd.js';
import { NotifySocket } from '../helpers/notify-socket.js';
import { runAsync, runAsyncOk } from '../helpers/run-async.js';
import { NBDD, requireTool, runStatus, tempDir } from '../helpers/tools.js';

let dir: ReturnType<typeof tempDir>;
let img: string;
beforeAll(() => {
  for (const t of ['systemd-analyze', 'systemd-socket-activate', 'nbdinfo']) requireTool(t);
  dir = tempDir('nbdd-systemd-');
  img = join(dir.path, 'disk.raw');
  writeFileSync(img, Buffer.alloc(4 << 20, 7));
});
afterAll(() => dir.remove());

function collect(child: ChildProcess): () => string {
  let err = '';
  child.stderr?.on('data', (b) => (err += b));
  return () => err;
}
const exited = (child: ChildProcess) => new Promise<number | null>((r) => (child.exitCode !== null ? r(child.exitCode) : child.once('exit', r)));

describe('units', () => {
  it('install-systemd writes units that systemd-analyze verify accepts, naming this nbdd', () => {
    const units = join(dir.path, 'units');
    const r = runStatus(NBDD, ['install-systemd', '--dir', units, '--conf-dir', join(dir.path, 'etc-nbdd'), '--no-reload']);
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(dir.path, 'etc-nbdd'))).toBe(true);
    const service = readFileSync(join(units, 'nbdd@.service'), 'utf8');
    expect(service).toMatch(new RegExp(`^ExecStart=${process.execPath} ${NODE_FLAGS.join(' ')} /\\S+/bin/nbdd attach --foreground --name %i \\$NBDD_OPTIONS \\$\\{IMAGE\\}$`, 'm'));
    expect(service).toMatch(/^Type=notify$/m);
    // verify wants instances of the templates.
    for (const [template, instance] of [['nbdd@.service', 'nbdd@disk0.service'], ['nbdd-serve@.service', 'nbdd-serve@disk0.service'], ['nbdd-serve@.socket', 'nbdd-serve@disk0.socket']]) {
      symlinkSync(join(units, template!), join(units, instance!));
    }
    const v = runStatus('systemd-analyze', ['verify', ...['nbdd@disk0.service', 'nbdd-serve@disk0.service', 'nbdd-serve@disk0.socket'].map((u) => join(units, u))]);
    expect(v.status, v.stdout + v.stderr).toBe(0);
    expect(v.stderr.split('\n').filter((l) => /nbdd/.test(l)), v.stderr).toEqual([]);
  });
});

describe('readiness (sd_notify)', () => {
  it('serve sends READY=1 with MAINPID once the socket answers, STOPPING=1 on SIGTERM', async () => {
    const notify = NotifySocket.bind(join(dir.path, 'notify.sock'));
    const sock = join(dir.path, 'served.sock');
    const child = spawn(NBDD, ['serve', img, '--socket', sock], { env: { ...process.env, NOTIFY_SOCKET: notify.path }, stdio: ['ignore', 'ignore', 'pipe'] });
    const stderr = collect(child);
    try {
      const ready = await notify.waitFor('READY');
      expect(ready.fields).toMatchObject({ READY: '1', MAINPID: String(child.pid) });
      expect(ready.fields.STATUS).toContain(`serving ${img} at nbd+unix:`);
      // Usable the moment READY=1 arrived: the socket exists and serves the whole image.
      expect(existsSync(sock)).toBe(true);
      expect((await runAsyncOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`])).trim()).toBe(String(4 << 20));
      child.kill('SIGTERM');
      expect((await notify.waitFor('STOPPING')).fields.STOPPING).toBe('1');
      expect(await exited(child), stderr()).toBe(0);
      expect(notify.messages.findIndex((m) => 'READY' in m.fields)).toBeLessThan(notify.messages.findIndex((m) => 'STOPPING' in m.fields));
    } finally {
      child.kill('SIGKILL');
      notify.close();
    }
  });

  it('a NOTIFY_SOCKET nobody listens on costs a warning, not the service', async () => {
    const sock = join(dir.path, 'lonely.sock');
    const child = spawn(NBDD, ['serve', img, '--socket', sock], { env: { ...process.env, NOTIFY_SOCKET: join(dir.path, 'nobody-here') }, stdio: ['ignore', 'ignore', 'pipe'] });
    const stderr = collect(child);
    try {
      for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
      expect((await runAsyncOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`])).trim()).toBe(String(4 << 20));
      expect(stderr()).toMatch(/notifying systemd .*ENOENT/);
    } finally {
      child.kill('SIGTERM');
      await exited(child);
    }
  });

  it('sdNotify sends nothing without NOTIFY_SOCKET and refuses non-unix addresses', () => {
    expect(sdNotify({ READY: 1 }, {})).toBe(false);
    expect(sdNotify({ READY: 1 }, { NOTIFY_SOCKET: 'vsock:2:1' })).toBe(false);
  });
});

describe('socket activation (LISTEN_FDS)', () => {
  it('serves the socket systemd-socket-activate passes, and reports ready', async () => {
    const notify = NotifySocket.bind(join(dir.path, 'notify-sa.sock'));
    const sock = join(dir.path, 'activated.sock');
    const act = spawn('systemd-socket-activate', ['-l', sock, '-E', `NOTIFY_SOCKET=${notify.path}`, process.execPath, NBDD, 'serve', img, '--read-only'], { stdio: ['ignore', 'ignore', 'pipe'] });
    const stderr = collect(act);
    try {
      for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
      // The first connection starts nbdd, which takes it from the inherited listening socket.
      const r = await runAsync('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`], 30_000);
      expect(r.code, r.stderr + stderr()).toBe(0);
      expect(r.stdout.trim()).toBe(String(4 << 20));
      const ready = await notify.waitFor('READY');
      expect(ready.fields.STATUS).toContain(`socket=${encodeURIComponent(sock)}`);
      expect(stderr()).toMatch(/listening on fd 3/);
    } finally {
      act.kill('SIGTERM');
      await exited(act);
      notify.close();
    }
  });

  it('listenFds takes only fds meant for this process, and clears the variables', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '4242', LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' };
    expect(listenFds(env, 4242)).toEqual([3, 4]);
    expect(env).toEqual({});
    expect(listenFds({ LISTEN_PID: '1', LISTEN_FDS: '1' }, 4242)).toEqual([]);
    expect(listenFds({ LISTEN_PID: '4242', LISTEN_FDS: 'x' }, 4242)).toEqual([]);
    expect(listenFds({}, 4242)).toEqual([]);
  });
});
