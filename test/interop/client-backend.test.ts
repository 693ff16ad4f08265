/** NbdBackend (openNbd) over real servers: caps from the export's flags, multi-conn, block status. */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { openNbd } from '../../src/backends/nbd.js';
import { readFileSync, writeFileSync } from 'node:fs';
import { run, startNbdkit, startQemuNbd, tempDir, type Peer } from './nbd-peers.js';
import { serveNbdd } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const dir = tempDir('nbdd-nbd-backend-');
const peers: Peer[] = [];

afterAll(async () => {
  const stops = await Promise.allSettled(peers.map((p) => p.stop()));
  dir.remove();
  for (const s of stops) if (s.status === 'rejected') throw s.reason;
});

describe('openNbd', () => {
  it('opens nbdkit memory with four connections, round-robin, and reports holes and data', async () => {
    const server = await startNbdkit(dir.path, ['memory', '16M']);
    peers.push(server);
    const b = await openNbd(server.uri, { connections: 4 });
    expect(b.connections).toBe(4);
    expect(b.kind).toBe('nbd');
    expect(b.size).toBe(16 * MiB);
    expect(b.caps).toMatchObject({ readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, multiConn: true });
    const blocks = Array.from({ length: 16 }, (_, i) => Buffer.alloc(64 * 1024, i + 1));
    await Promise.all(blocks.map((d, i) => b.write(2 * MiB + i * d.length, d, { fua: i === 0 })));
    await b.flush();
    const back = await Promise.all(blocks.map((d, i) => b.read(2 * MiB + i * d.length, d.length)));
    back.forEach((d, i) => expect(d.equals(blocks[i]!)).toBe(true));
    await b.writeZeroes(2 * MiB, 64 * 1024, { fastZero: true });
    expect(await b.blockStatus(0, 16 * MiB)).toEqual([
      { length: 2 * MiB + 64 * 1024, hole: true, zero: true, depth: 0 },
      { length: MiB - 64 * 1024, hole: false, zero: false, depth: 1 },
      { length: 13 * MiB, hole: true, zero: true, depth: 0 },
    ]);
    await b.close();
    await b.close();
  });

  it('takes depth from qemu:allocation-depth and honours a read-only export', async () => {
    const base = join(dir.path, 'base.qcow2');
    const top = join(dir.path, 'top.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 1M', base]);
    run('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 512k 1M', top]);
    const server = await startQemuNbd(dir.path, 'top', ['-r', '-A', '-f', 'qcow2', top]);
    peers.push(server);
    const b = await openNbd(server.uri, { connections: 4 });
    // qemu-nbd offers multi-conn on read-only exports only.
    expect(b.connections).toBe(4);
    expect(b.caps).toMatchObject({ readOnly: true, multiConn: true });
    expect(await b.blockStatus(0, 4 * MiB)).toEqual([
      { length: 512 * 1024, hole: false, zero: false, depth: 2 },
      { length: MiB, hole: false, zero: false, depth: 1 },
      { length: 2.5 * MiB, hole: true, zero: true, depth: 0 },
    ]);
    const data = await b.read(0, 2 * MiB);
    expect(data.subarray(0, 512 * 1024).equals(Buffer.alloc(512 * 1024, 1))).toBe(true);
    expect(data.subarray(512 * 1024, 1536 * 1024).equals(Buffer.alloc(MiB, 2))).toBe(true);
    const err = await b.write(0, Buffer.alloc(512)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbddError);
    expect((err as NbddError).errno).toBe(Errno.EPERM);
    await b.close();
  });

  it('fails to open an unknown export with ENOENT', async () => {
    const qemuNbd = peers[1]!; // nbdkit would serve any name
    const err = await openNbd(qemuNbd.uri.replace('nbd+unix:///top', 'nbd+unix:///nope')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbddError);
    expect((err as NbddError).errno).toBe(Errno.ENOENT);
  });

  it('keeps at most maxInFlight requests at the server; the others wait their turn, in order, and all complete', async () => {
    const server = await startNbdkit(dir.path, ['--filter=delay', 'memory', '4M', 'delay-read=50ms', 'delay-write=50ms']);
    peers.push(server);
    const b = await openNbd(server.uri, { connections: 2, maxInFlight: 3 });
    try {
      let peak = 0;
      const done: number[] = [];
      const ops = Array.from({ length: 12 }, (_, i) =>
        (i % 2 ? b.read(i * 4096, 4096) : b.write(i * 4096, Buffer.alloc(4096, i))).then(() => done.push(i)),
      );
      const sample = setInterval(() => (peak = Math.max(peak, b.requestsInFlight)), 5);
      await Promise.all(ops);
      clearInterval(sample);
      expect(peak).toBe(3);
      expect(b.requestsInFlight).toBe(0);
      // Slots go to the oldest waiter: the last three started are the last three done.
      expect(done.slice(-3).sort((x, y) => x - y)).toEqual([9, 10, 11]);
    } finally {
      await b.close();
    }
  });

  it('nbdd serve URI --connections 4: four connections to a multi-conn remote, requests spread over all, bytes intact', async () => {
    const log = join(dir.path, 'multi.log');
    const server = await startNbdkit(dir.path, ['--filter=log', 'memory', '16M', `logfile=${log}`]);
    peers.push(server);
    const served = await serveNbdd(server.uri, ['--connections', '4']);
    try {
      const data = Buffer.alloc(4 * MiB);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
      const src = join(dir.path, 'multi.bin');
      const back = join(dir.path, 'multi-back.bin');
      writeFileSync(src, data);
      run('nbdcopy', ['--connections=4', src, served.uri]);
      run('nbdcopy', ['--connections=4', served.uri, back]);
      expect(readFileSync(back).subarray(0, data.length).equals(data)).toBe(true);
    } finally {
      await served.stop();
    }
    const lines = readFileSync(log, 'utf8').split('\n');
    const ids = (what: RegExp): Set<string> => new Set(lines.filter((l) => what.test(l)).map((l) => /connection=(\d+)/.exec(l)![1]!));
    expect(ids(/ Connect /).size).toBe(4);
    expect(ids(/ (Read|Write) /).size).toBe(4);
  });
});
