/**
 * qcow2 overlays whose backing file is an NBD export (src/backends/nbd-layer.ts): created by
 * `nbdd create -b URI` or `qemu-img create -b URI -F raw`, served by nbdd with
 * --allow-remote-backing. Untouched clusters read from the remote, writes stay in the overlay
 * (the remote file's checksum is unchanged), block status matches qemu-nbd serving the same
 * overlay, and a remote restart is a pause (logged, and in `nbdd status`). Without the option
 * nbdd does not connect at all.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuCheck, qemuCompare, qemuMap, requireQemu } from '../helpers/qemu.js';
import { prng } from '../helpers/prng.js';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';
import { startNbdkitAt, startQemuNbd, type Peer } from './nbd-peers.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
let dir: ReturnType<typeof tempDir>;
let n = 0;

beforeAll(() => {
  requireQemu();
  requireTool('nbdkit');
  requireTool('nbdinfo');
  dir = tempDir('nbdd-remote-backing-');
});
afterAll(() => dir.remove());

const sha = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

/** A raw base with data in a few places (holes elsewhere), served by nbdkit file on its own socket. */
async function remoteBase(): Promise<{ file: string; socket: string; uri: string; start: () => Promise<Peer> }> {
  const id = n++;
  const file = join(dir.path, `base-${id}.raw`);
  run('truncate', ['-s', String(SIZE), file]);
  const fill = (offset: number, bytes: number, seed: number): void => {
    const next = prng(seed);
    const buf = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i += 4) buf.writeUInt32LE(Math.floor(next() * 2 ** 32), i);
    run('dd', [`of=${file}`, 'bs=64k', `seek=${offset / 65536}`, 'conv=notrunc', 'status=none'], { input: buf });
  };
  fill(0, MiB, 1);
  fill(5 * MiB, 2 * MiB, 2);
  fill(15 * MiB, MiB, 3);
  const socket = join(dir.path, `base-${id}.sock`);
  return { file, socket, uri: `nbd+unix:///?socket=${socket}`, start: () => startNbdkitAt(socket, ['file', `file=${file}`]) };
}

/** The whole export, copied with nbdcopy. */
function readAll(uri: string): Buffer {
  const out = join(dir.path, `read-${n++}.bin`);
  run('nbdcopy', [uri, out]);
  return readFileSync(out);
}

/** An overlay made by qemu-img without opening its backing file (-u): nothing connects yet. */
function overlay(path: string, backingUri: string, format = 'raw'): void {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', backingUri, '-F', format, path, String(SIZE)]);
}

interface Extent {
  offset: number;
  length: number;
  type: number;
}
function nbdinfoMap(uri: string, context: string): Extent[] {
  return (JSON.parse(run('nbdinfo', [`--map=${context}`, '--json', uri])) as Extent[]).map(({ offset, length, type }) => ({ offset, length, type }));
}

describe('qcow2 overlay over a remote NBD base', () => {
  it('nbdd create -b URI takes the export size and stores the URI with format raw, as qemu reads it', async () => {
    const base = await remoteBase();
    const peer = await base.start();
    try {
      const ov = join(dir.path, 'created.qcow2');
      run(NBDD, ['create', '-f', 'qcow2', ov, '-b', base.uri]);
      const info = JSON.parse(run('qemu-img', ['info', '--output=json', ov])) as Record<string, unknown>;
      expect(info['backing-filename']).toBe(base.uri);
      expect(info['backing-filename-format']).toBe('raw');
      expect(info['virtual-size']).toBe(SIZE);
      expect(qemuCheck(ov).status).toBe(0);
      // -F qcow2 is not what an export is.
      const bad = runStatus(NBDD, ['create', '-f', 'qcow2', join(dir.path, 'bad.qcow2'), '-b', base.uri, '-F', 'qcow2']);
      expect(bad.status).not.toBe(0);
      expect(bad.stderr).toMatch(/raw layer/);
    } finally {
      await peer.stop();
    }
  });

  it('without --allow-remote-backing refuses the image, naming the option, and never connects to the socket it names', async () => {
    const socket = join(dir.path, 'trap.sock');
    let accepted = 0;
    const trap = net.createServer((s) => {
      accepted++;
      s.destroy();
    });
    await new Promise<void>((r) => trap.listen(socket, r));
    try {
      const ov = join(dir.path, 'stranger.qcow2');
      overlay(ov, `nbd+unix:///secret?socket=${socket}`);
      const before = sha(ov);
      for (const args of [['serve', ov, '--socket', join(dir.path, 'x.sock')], ['info', ov], ['map', ov]]) {
        const r = runStatus(NBDD, args);
        expect(r.status, args.join(' ')).not.toBe(0);
        expect(r.stderr).toContain('--allow-remote-backing');
        expect(r.stderr).not.toMatch(/\n\s+at /); // a message, not a stack
      }
      expect(accepted).toBe(0);
      expect(sha(ov)).toBe(before);
    } finally {
      await new Promise((r) => trap.close(r));
    }
  });

  it('serves a qemu-made overlay: untouched clusters from the remote, writes stay local (remote checksum unchanged)', async () => {
    const base = await remoteBase();
    const peer = await base.start();
    const ov = join(dir.path, 'rw.qcow2');
    overlay(ov, base.uri);
    const remoteSum = sha(base.file);
    const srv = await serveNbdd(ov, ['--allow-remote-backing']);
    try {
      // Reads through nbdd equal the base where nothing was written.
      expect(readAll(srv.uri).equals(readFileSync(base.file))).toBe(true);
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 64k 64k', '-c', 'write -z 5M 128k', '-c', 'write -P 0x5b 8M 4k', srv.uri]);
    } finally {
      await srv.stop();
    }
    try {
      expect(sha(base.file)).toBe(remoteSum);
      expect(qemuCheck(ov).status).toBe(0);
      // What qemu reads of the overlay (following the same backing URI) is the base with those writes.
      const expected = Buffer.from(readFileSync(base.file));
      expected.fill(0x5a, 64 * 1024, 128 * 1024);
      expected.fill(0, 5 * MiB, 5 * MiB + 128 * 1024);
      expected.fill(0x5b, 8 * MiB, 8 * MiB + 4096);
      const want = join(dir.path, 'want.raw');
      writeFileSync(want, expected);
      const cmp = qemuCompare(want, ov, 'raw', 'qcow2');
      expect(cmp.output).toContain('Images are identical');
    } finally {
      await peer.stop();
    }
  });

  it('publishes base:allocation and qemu:allocation-depth as qemu-nbd does for the same overlay', async () => {
    const base = await remoteBase();
    const peer = await base.start();
    const ov = join(dir.path, 'map.qcow2');
    overlay(ov, base.uri);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 128k 64k', '-c', 'write -z 6M 64k', ov]);
    const ours = await serveNbdd(ov, ['--read-only', '--allow-remote-backing']);
    const theirs = await startQemuNbd(dir.path, 'ov', ['-r', '-A', '-f', 'qcow2', ov]);
    try {
      for (const context of ['base:allocation', 'qemu:allocation-depth']) {
        expect(nbdinfoMap(ours.uri, context), context).toEqual(nbdinfoMap(theirs.uri, context));
      }
      const map = JSON.parse(run(NBDD, ['map', '--qemu-json', '--allow-remote-backing', ov])) as { start: number; length: number; depth: number; zero: boolean; data: boolean }[];
      expect(map).toEqual(qemuMap(ov).map(({ start, length, depth, present, zero, data }) => ({ start, length, depth, present, zero, data })));
    } finally {
      await theirs.stop();
      await ours.stop();
      await peer.stop();
    }
  });

  it('a read of a remote cluster while the remote restarts waits and completes with the right bytes', async () => {
    const base = await remoteBase();
    let peer = await base.start();
    const ov = join(dir.path, 'restart.qcow2');
    overlay(ov, base.uri);
    const name = `rb-${process.pid}-${n}`;
    const srv = await serveNbdd(ov, ['--allow-remote-backing', '--reconnect-delay', '30', '--name', name]);
    try {
      await peer.kill();
      const reader = spawn('qemu-io', ['-f', 'raw', '-c', `read -v 5M 512`, srv.uri], { stdio: ['ignore', 'pipe', 'pipe'] });
      let text = '';
      reader.stdout!.on('data', (b) => (text += b));
      const exited = new Promise<number | null>((r) => reader.once('exit', r));
      await new Promise((r) => setTimeout(r, 1500));
      expect(reader.exitCode).toBeNull(); // still waiting for the remote
      peer = await base.start();
      expect(await exited).toBe(0);
      const want = readFileSync(base.file).subarray(5 * MiB, 5 * MiB + 16);
      const firstLine = text.split('\n')[0]!;
      const hex = [...want].map((b) => b.toString(16).padStart(2, '0')).join(' ');
      expect(firstLine).toContain(hex);
      // The device's status and log name the remote the backing file lives on.
      expect(srv.stderr()).toMatch(/remote-lost: [\s\S]*remote-reconnected: /);
      const status = JSON.parse(run(NBDD, ['status', name, '--json'])) as { remote?: unknown };
      expect(status.remote).toEqual({ uri: base.uri, state: 'connected', reconnects: 1 });
    } finally {
      await srv.stop();
      await peer.stop();
    }
  });
});
