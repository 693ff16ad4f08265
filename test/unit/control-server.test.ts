import net from 'node:net';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { chmodSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/control-client.js';
import { ControlServer } from '../../src/control/control-server.js';
import { RPC_ERROR } from '../../src/control/jsonrpc.js';
import { deviceMethods } from '../../src/control/methods.js';
import { peerCredentials } from '../../src/sys/libc.js';
import { FakeDevice } from '../helpers/fake-device.js';

/** A raw line-level connection, to send what a real client never would. */
class RawConn {
  private buf = '';
  private waiters: (() => void)[] = [];
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      this.waiters.splice(0).forEach((w) => w());
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiters.splice(0).forEach((w) => w());
    });
    socket.on('error', () => undefined);
  }
  static open(path: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }
  async line(): Promise<any> {
    for (;;) {
      const nl = this.buf.indexOf('\n');
      if (nl >= 0) {
        const l = this.buf.slice(0, nl);
        this.buf = this.buf.slice(nl + 1);
        return JSON.parse(l);
      }
      if (this.closed) throw new Error('closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
}

describe('ControlServer', () => {
  let dir: string;
  let path: string;
  let device: FakeDevice;
  let server: ControlServer;
  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'nbdd-ctl-'));
    path = join(dir, 'control.sock');
    device = await FakeDevice.create();
    server = new ControlServer(deviceMethods(device));
    await server.listen(path);
  });
  afterEach(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves the bitmap methods to the client, on a 0600 socket', async () => {
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const c = await ControlClient.connect(path);
    expect(await c.call('bitmap.add', { name: 'b0', granularity: 4096 })).toMatchObject({ name: 'b0', granularity: 4096, enabled: true, persistent: false });
    await c.call('checkpoint', { name: 'b1' });
    device.bitmaps.mark(0, 1);
    expect(await c.call('bitmap.list')).toMatchObject([
      { name: 'b0', enabled: false, dirtyBytes: 0 },
      { name: 'b1', enabled: true, dirtyBytes: 65536 },
    ]);
    await c.call('bitmap.merge', { target: 'b0', sources: ['b1'] });
    await c.call('bitmap.clear', { name: 'b1' });
    await c.call('bitmap.remove', { name: 'b1' });
    expect(await c.call('bitmap.list')).toMatchObject([{ name: 'b0', dirtyBytes: 65536 }]);
    await expect(c.call('bitmap.remove', { name: 'zz' })).rejects.toMatchObject({ code: RPC_ERROR.OPERATION_FAILED, data: { errno: 'ENOENT' } });
    await expect(c.call('backup.begin', { onLimit: 'explode' })).rejects.toMatchObject({ code: RPC_ERROR.INVALID_PARAMS });
    expect(await c.call('backup.begin', { bitmap: 'b0' })).toEqual({ export: 'backup' });
    expect(await c.call('status')).toEqual({ name: 'fake', size: 1 << 20 });
    await c.close();
  });

  it('keeps a connection through malformed JSON, wrong types, unknown methods and huge lines', async () => {
    const conn = await RawConn.open(path);
    const send = (s: string) => conn.socket.write(s);
    send('{"jsonrpc":"2.0",,,}\n');
    expect((await conn.line()).error.code).toBe(RPC_ERROR.PARSE_ERROR);
    send('{"jsonrpc":"2.0","id":1,"method":"bitmap.add","params":{"name":5}}\n');
    expect(await conn.line()).toMatchObject({ id: 1, error: { code: RPC_ERROR.INVALID_PARAMS } });
    send('{"jsonrpc":"2.0","id":2,"method":"rm -rf"}\n');
    expect(await conn.line()).toMatchObject({ id: 2, error: { code: RPC_ERROR.METHOD_NOT_FOUND } });
    send('\u0000\u00ff garbage \n');
    expect((await conn.line()).error.code).toBe(RPC_ERROR.PARSE_ERROR);
    // 3 MiB without a newline, in pieces, then the newline: one error, nothing buffered.
    const piece = 'x'.repeat(256 * 1024);
    for (let i = 0; i < 12; i++) send(piece);
    send('\n');
    expect(await conn.line()).toMatchObject({ id: null, error: { code: RPC_ERROR.INVALID_REQUEST, message: expect.stringMatching(/exceeds/) } });
    send('{"jsonrpc":"2.0","id":3,"method":"bitmap.add","params":{"name":"ok"}}\n{"jsonrpc":"2.0","id":4,"method":"bitmap.list"}\n');
    expect(await conn.line()).toMatchObject({ id: 3, result: { name: 'ok' } });
    expect(await conn.line()).toMatchObject({ id: 4, result: [{ name: 'ok' }] });
    expect(conn.closed).toBe(false);
    conn.socket.destroy();
  });

  it('streams subscribed events as notifications until unsubscribed', async () => {
    const c = await ControlClient.connect(path);
    const got: any[] = [];
    c.onNotification = (method, params) => got.push({ method, params });
    expect(await c.call('events.subscribe', { types: ['link-dead', 'dirty'] })).toEqual({ types: ['link-dead', 'dirty'] });
    await expect(c.call('events.subscribe', { types: ['nope'] })).rejects.toMatchObject({ code: RPC_ERROR.INVALID_PARAMS });
    device.events.publish('link-dead', { reason: 'test' });
    device.events.publish('error', { message: 'not subscribed' });
    await c.call('status'); // a round trip: the notification was written before the response
    expect(got).toEqual([{ method: 'event', params: { type: 'link-dead', reason: 'test', time: expect.any(String) } }]);
    await c.call('events.unsubscribe');
    device.events.publish('link-dead');
    await c.call('status');
    expect(got).toHaveLength(1);
    expect(device.events.wanted('link-dead')).toBe(false);
    await c.close();
  });

  it('drops subscriptions of closed connections and checks the peer uid', async () => {
    const c = await ControlClient.connect(path);
    await c.call('events.subscribe');
    expect(device.events.wanted('dirty')).toBe(true);
    await c.close();
    await new Promise((r) => setTimeout(r, 20));
    expect(device.events.wanted('dirty')).toBe(false);
    // Our own socket's peer is this process: SO_PEERCRED must say so.
    const conn = await RawConn.open(path);
    const cred = peerCredentials((conn.socket as any)._handle.fd);
    expect(cred).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    conn.socket.destroy();
    // A peer whose uid is not allowed is closed without an answer. Root is always allowed, so
    // as root the peer is a child process running as nobody (the socket opened up for it).
    const strictPath = join(dir, 'strict.sock');
    const strict = new ControlServer(deviceMethods(device), { allowedUids: [12345] });
    await strict.listen(strictPath);
    const script = `const s=require('net').connect(${JSON.stringify(strictPath)},()=>s.write('{"jsonrpc":"2.0","id":1,"method":"status"}\\n'));let got='';s.on('data',d=>got+=d);s.on('close',()=>{console.log(JSON.stringify(got));});s.on('error',e=>console.log('error '+e.code));`;
    const asRoot = process.getuid!() === 0;
    if (asRoot) {
      chmodSync(dir, 0o711);
      chmodSync(strictPath, 0o666);
    }
    const { stdout } = await promisify(execFile)(process.execPath, ['-e', script], asRoot ? { uid: 65534, gid: 65534, timeout: 10_000 } : { timeout: 10_000 });
    expect(stdout.trim().split('\n').pop()).toBe('""'); // connected, then closed with nothing sent back (maybe after 'error EPIPE')
    await strict.close();
  });

  it('answers nothing more while a pipelining client leaves its output unread, then everything once it reads', async () => {
    for (let i = 0; i < 200; i++) await device.bitmaps!.add(`b${i}-${'x'.repeat(900)}`); // bitmap.list ≈ 200 KB
    const methods = deviceMethods(device);
    let answered = 0;
    const list = methods['bitmap.list']!;
    methods['bitmap.list'] = { ...list, handler: (p, c) => (answered++, list.handler(p, c)) };
    const bounded = new ControlServer(methods);
    const bpath = join(dir, 'bounded.sock');
    await bounded.listen(bpath);
    const N = 300;
    const s = net.connect(bpath);
    await new Promise((r) => s.once('connect', r));
    s.pause(); // never reads, for now
    s.write(Array.from({ length: N }, (_, i) => `{"jsonrpc":"2.0","id":${i},"method":"bitmap.list"}\n`).join(''));
    await new Promise((r) => setTimeout(r, 1000));
    // 4 MiB of unread output plus the socket buffers hold a few dozen responses, not 300.
    expect(answered).toBeGreaterThan(0);
    expect(answered).toBeLessThan(60);
    // A well-behaved client is served meanwhile.
    const other = await ControlClient.connect(bpath);
    expect(await other.call('status', {})).toMatchObject({ name: 'fake' });
    await other.close();
    let lines = 0;
    s.setEncoding('utf8');
    s.on('data', (d: string) => (lines += d.split('\n').length - 1));
    s.resume();
    for (let i = 0; i < 200 && lines < N; i++) await new Promise((r) => setTimeout(r, 25));
    expect(lines).toBe(N);
    s.destroy();
    await bounded.close();
  });

  it('closes idle connections, but not ones subscribed to events', async () => {
    const quick = new ControlServer(deviceMethods(device), { idleTimeoutMs: 200 });
    const qpath = join(dir, 'quick.sock');
    await quick.listen(qpath);
    const idle = await RawConn.open(qpath);
    const listener = await RawConn.open(qpath);
    listener.socket.write('{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n');
    expect((await listener.line()).result).toEqual({ types: expect.any(Array) });
    await new Promise((r) => setTimeout(r, 700));
    expect(idle.closed).toBe(true);
    expect(listener.closed).toBe(false);
    listener.socket.destroy();
    await quick.close();
  });
});
