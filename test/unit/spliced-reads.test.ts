/**
 * Spliced READ replies (src/io/pipes.ts): a raw image's pages go into a pipe and from it into the
 * socket by reference. Driven over a socketpair the way the kernel's NBD connections are served,
 * on a disk filesystem (the ring's splice) and on tmpfs (the inline one): the bytes, the order of
 * replies, a peer that stops reading (the socket fills and the writer waits on the ring), a peer
 * that dies mid-reply, and the stacks that must not splice.
 */
import { closeSync, existsSync, readFileSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { RawBackend } from '../../src/backends/raw.js';
import { openImage } from '../../src/backends/open.js';
import type { Backend } from '../../src/core/backend.js';
import { BlockQueue } from '../../src/core/queue.js';
import { PassThroughLayer } from '../../src/core/layer.js';
import { pipes } from '../../src/io/pipes.js';
import { sharedEngine } from '../../src/io/open-port.js';
import { UringEngine } from '../../src/io/uring-engine.js';
import { CopyBeforeWriteLayer } from '../../src/layers/copy-before-write.js';
import { NBD_CMD, NBD_REPLY_TYPE } from '../../src/nbd/wire/constants.js';
import { closeFd, setUnixSendBuffer, sendBufferSize, socketPair } from '../../src/sys/libc.js';
import { socketFd } from '../../src/nbd/read-slab.js';
import { ScriptClient, clientFlags, optGo, optStructured, request } from '../helpers/nbd-script.js';
import { ServedStack, image, waitFor } from '../helpers/served-stack.js';

const SIZE = 8 << 20;
const MiB = 1 << 20;

const DIRS = [
  ['a disk filesystem (splice on the ring)', tmpdir()],
  ['tmpfs (splice on the event-loop thread)', '/dev/shm'],
] as const;

let dir: string;
const rig = new ServedStack();

afterEach(async () => {
  vi.restoreAllMocks();
  await rig.close();
});

/** The device stack over a raw image of `data`, and a kernel connection to it. */
async function kernelPair(base: string, data: Buffer): Promise<{ c: ScriptClient; path: string; ours: number }> {
  dir = rig.tempDir(base);
  const path = join(dir, 'disk.raw');
  writeFileSync(path, data);
  await rig.export(await RawBackend.open(path));
  return { ...rig.kernelConnection(), path };
}

/** Replies in cookie order are not promised: reads `n` simple replies, each with its request's length. */
async function replies(c: ScriptClient, lengths: Map<number, number>, n: number): Promise<Map<number, Buffer>> {
  const got = new Map<number, Buffer>();
  for (let i = 0; i < n; i++) {
    const head = await c.read(16, 20_000);
    const cookie = head.readUInt32BE(12);
    expect(head.readUInt32BE(4)).toBe(0); // no error
    got.set(cookie, Buffer.from(await c.read(lengths.get(cookie)!, 20_000)));
  }
  return got;
}

describe.each(DIRS)('spliced reads on %s', (_name, base) => {
  it.runIf(existsSync(base))('answers large reads from pipes and small ones from buffers, every byte in place, replies framed', async () => {
    const data = image(SIZE);
    const { c } = await kernelPair(base, data);
    expect(rig.stack!.queue.splicesReads).toBe(true);
    const given = vi.spyOn(pipes, 'give');
    const ringSplices = vi.spyOn(sharedEngine()!, 'splice');
    // Unaligned offsets and lengths, the smallest spliced length and just under it, a write
    // between reads of the same range, and 1 MiB reads.
    const reqs = [
      { offset: 0, length: MiB },
      { offset: 4095, length: 64 * 1024 },
      { offset: 12_345, length: 64 * 1024 - 1 },
      { offset: 3 * MiB + 17, length: 300_001 },
      { offset: SIZE - MiB, length: MiB },
      { offset: 2 * MiB, length: 4096 },
    ];
    const lengths = new Map(reqs.map((r, i) => [i + 1, r.length]));
    c.send(Buffer.concat(reqs.map((r, i) => request(NBD_CMD.READ, i + 1, r.offset, r.length))));
    const got = await replies(c, lengths, reqs.length);
    reqs.forEach((r, i) => expect(got.get(i + 1)!.equals(data.subarray(r.offset, r.offset + r.length)), `read ${i + 1}`).toBe(true));
    // Four of them at least 64 KiB: four pipes given back, none left out.
    expect(given).toHaveBeenCalledTimes(4);
    expect(pipes.inUse).toBe(0);
    // Memory filesystems splice on this thread; the others on the ring.
    if (base === '/dev/shm') expect(ringSplices).not.toHaveBeenCalled();
    else expect(ringSplices).toHaveBeenCalled();

    // A write, then a read of the same range: the read shows it.
    const fresh = Buffer.alloc(MiB, 0x5a);
    c.send(request(NBD_CMD.WRITE, 50, MiB, MiB, 0, fresh));
    expect((await c.readSimpleReply()).error).toBe(0);
    c.send(request(NBD_CMD.READ, 51, MiB, MiB));
    expect((await c.readSimpleReply(MiB)).data.equals(fresh)).toBe(true);
    c.destroy();
  }, 60_000);

  it.runIf(existsSync(base))('waits for room when the peer stops reading, and sends everything in order once it reads again', async () => {
    const data = image(SIZE);
    const { c, ours } = await kernelPair(base, data);
    // A small send buffer on the daemon's end, so that a pipe's bytes, not a header, find it full.
    setUnixSendBuffer(ours, 64 * 1024);
    c.stopReading();
    const engine = sharedEngine()!;
    const waits = vi.spyOn(engine, 'waitWritable');
    // 40 MiB of replies against a socket buffer of 128 KiB: the splices must wait. The first 24
    // page-aligned (spliced: a 1 MiB pipe holds 256 pages); once a splice waits, more with
    // unaligned ones among them (257 pages: read into buffers), so spliced and buffered replies
    // queue up behind the waiting one, and must leave in an order that keeps the framing.
    const n = 40;
    const first = 24;
    const offsets = Array.from({ length: n }, (_, i) => ((i * 5 + 3) % 8) * MiB - (i < first || i % 2 ? 0 : 512 * (i % 3)));
    const safe = offsets.map((o) => Math.max(0, Math.min(o, SIZE - MiB)));
    c.send(Buffer.concat(safe.slice(0, first).map((o, i) => request(NBD_CMD.READ, i + 1, o, MiB))));
    await waitFor(() => waits.mock.calls.length > 0);
    c.send(Buffer.concat(safe.slice(first).map((o, i) => request(NBD_CMD.READ, i + first + 1, o, MiB))));
    // A small read behind them: its reply may not overtake a spliced one half-way through.
    c.send(request(NBD_CMD.READ, 100, 0, 512));
    await new Promise((r) => setTimeout(r, 200));
    const lengths = new Map([...safe.map((_, i) => [i + 1, MiB] as [number, number]), [100, 512]]);
    (c as unknown as { socket: net.Socket }).socket.resume();
    const got = await replies(c, lengths, n + 1);
    safe.forEach((o, i) => expect(got.get(i + 1)!.equals(data.subarray(o, o + MiB)), `read ${i + 1}`).toBe(true));
    expect(got.get(100)!.equals(data.subarray(0, 512))).toBe(true);
    await waitFor(() => pipes.inUse === 0);
    c.destroy();
  }, 60_000);

  it.runIf(existsSync(base))('survives a peer that dies while replies wait for room: pipes closed, no poll left on the ring', async () => {
    const { c, ours } = await kernelPair(base, image(SIZE));
    setUnixSendBuffer(ours, 64 * 1024);
    c.stopReading();
    const engine = sharedEngine()!;
    const waits = vi.spyOn(engine, 'waitWritable');
    const reads = (from: number, n: number): Buffer => Buffer.concat(Array.from({ length: n }, (_, i) => request(NBD_CMD.READ, from + i, ((from + i) % 7) * MiB, MiB)));
    c.send(reads(1, 32));
    await waitFor(() => waits.mock.calls.length > 0);
    // More than the pool has pipes: the rest are read into buffers and queue behind.
    c.send(reads(33, 64));
    // Meanwhile another connection is served (from a pipe, or a buffer if the first took them all).
    const { c: c2 } = rig.kernelConnection();
    c2.send(request(NBD_CMD.READ, 7, 0, MiB));
    expect((await c2.readSimpleReply(MiB)).error).toBe(0);
    expect(pipes.inUse).toBeGreaterThan(0);
    c.destroy();
    await waitFor(() => pipes.inUse === 0);
    await waitFor(() => engine.inFlight === 0);
    // And after the first one died.
    c2.send(request(NBD_CMD.READ, 8, MiB, MiB));
    expect((await c2.readSimpleReply(MiB)).error).toBe(0);
    c2.destroy();
  }, 60_000);

  it.runIf(existsSync(base))('reads the usual way where the file ends early (truncated behind its back): zeroes past the end', async () => {
    const data = image(SIZE);
    const { c, path } = await kernelPair(base, data);
    truncateSync(path, SIZE - MiB / 2);
    c.send(request(NBD_CMD.READ, 1, SIZE - MiB, MiB));
    const r = await c.readSimpleReply(MiB);
    expect(r.error).toBe(0);
    expect(r.data.subarray(0, MiB / 2).equals(data.subarray(SIZE - MiB, SIZE - MiB / 2))).toBe(true);
    expect(r.data.subarray(MiB / 2).equals(Buffer.alloc(MiB / 2))).toBe(true);
    expect(pipes.inUse).toBe(0);
    c.destroy();
  }, 60_000);
});

describe('spliced reads to a client connection (structured replies, sparse reads)', () => {
  it('sends data extents from pipes and holes as OFFSET_HOLE, in one reply that reassembles to the image', async () => {
    dir = rig.tempDir(tmpdir());
    const path = join(dir, 'disk.raw');
    // Data, a 1 MiB hole, data: a 3 MiB read crosses all three.
    const data = image(SIZE);
    data.fill(0, 2 * MiB, 3 * MiB);
    writeFileSync(path, data.subarray(0, 2 * MiB));
    const fd = openSync(path, 'r+');
    writeSync(fd, data.subarray(3 * MiB), 0, SIZE - 3 * MiB, 3 * MiB);
    closeSync(fd);
    await rig.export(await RawBackend.open(path));
    const sock = join(dir, 's');
    await rig.server!.listenUnix(sock);
    const c = rig.adopt(await ScriptClient.connect(sock));
    await c.readGreeting();
    c.send(clientFlags());
    c.send(optStructured());
    await c.readOptionReply();
    c.send(optGo('disk'));
    await c.readOptionReplies();
    const given = vi.spyOn(pipes, 'give');
    const offset = MiB + 4096;
    const length = 3 * MiB - 4096; // both data parts fit a 1 MiB pipe (256 pages)
    c.send(request(NBD_CMD.READ, 1, offset, length));
    const got = Buffer.alloc(length, 0xee);
    const kinds: string[] = [];
    for (;;) {
      const r = await c.readReply();
      if (r.kind !== 'chunk') throw new Error('expected structured replies');
      const ch = r.chunk;
      if (ch.type === NBD_REPLY_TYPE.OFFSET_DATA) {
        ch.data.copy(got, ch.offset - offset);
        kinds.push('data');
      } else if (ch.type === NBD_REPLY_TYPE.OFFSET_HOLE) {
        got.fill(0, ch.offset - offset, ch.offset - offset + ch.size);
        kinds.push('hole');
      } else throw new Error(`unexpected chunk ${ch.type}`);
      if (r.done) break;
    }
    expect(kinds).toEqual(['data', 'hole', 'data']);
    expect(got.equals(data.subarray(offset, offset + length))).toBe(true);
    expect(given).toHaveBeenCalledTimes(2);
    expect(pipes.inUse).toBe(0);
    c.destroy();
  }, 60_000);
});

describe('spliced reads of a qcow2 image', () => {
  it('splices runs of data clusters; zero, unallocated and mixed ranges are read into buffers', async () => {
    dir = rig.tempDir(tmpdir());
    const path = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(SIZE)]);
    await rig.export(await openImage(path, {}));
    expect(rig.stack!.queue.splicesReads).toBe(true);
    const { c } = rig.kernelConnection();
    // Data in [0, 2 MiB), zeroes in [2, 3) MiB, nothing written from 3 MiB.
    const data = image(2 * MiB);
    c.send(request(NBD_CMD.WRITE, 1, 0, 2 * MiB, 0, data));
    expect((await c.readSimpleReply()).error).toBe(0);
    c.send(request(NBD_CMD.WRITE_ZEROES, 2, 2 * MiB, MiB));
    expect((await c.readSimpleReply()).error).toBe(0);
    const given = vi.spyOn(pipes, 'give');
    const discarded = vi.spyOn(pipes, 'discard');
    const expected = Buffer.concat([data, Buffer.alloc(SIZE - 2 * MiB)]);
    const reads = [
      { offset: 0, length: MiB }, // data: spliced
      { offset: MiB + MiB / 2, length: MiB }, // data then zeroes
      { offset: 3 * MiB, length: MiB }, // unallocated
      { offset: 2 * MiB, length: 256 * 1024 }, // zeroes
      // One cluster each (64 KiB, the smallest spliced read): one step of the mapping walk.
      { offset: 2 * MiB + 64 * 1024, length: 64 * 1024 }, // a zero cluster
      { offset: 5 * MiB, length: 64 * 1024 }, // an unallocated one
    ];
    for (const [i, r] of reads.entries()) {
      c.send(request(NBD_CMD.READ, 10 + i, r.offset, r.length));
      const got = await c.readSimpleReply(r.length);
      expect(got.data.equals(expected.subarray(r.offset, r.offset + r.length)), `read ${i}`).toBe(true);
    }
    // One pipe sent, five given back untouched; none closed.
    expect(given).toHaveBeenCalledTimes(6);
    expect(discarded).not.toHaveBeenCalled();
    expect(pipes.inUse).toBe(0);
    c.destroy();
  }, 60_000);
});

describe('which stacks splice', () => {
  it('a layer that does not say so stops spliced reads; a backup view never has them', async () => {
    dir = rig.tempDir(tmpdir());
    const path = join(dir, 'disk.raw');
    writeFileSync(path, Buffer.alloc(MiB));
    const raw = await RawBackend.open(path);
    expect(raw.spliceRead).toBeDefined();
    // A layer that changes reads and forgot about pipes: the stack must not splice past it.
    class Rot13 extends PassThroughLayer {
      override read(offset: number, length: number): Promise<Buffer> {
        return super.read(offset, length).then((b) => b.map((x) => x ^ 13) as Buffer);
      }
    }
    expect(new BlockQueue(new Rot13(raw)).splicesReads).toBe(false);
    const cbw = new CopyBeforeWriteLayer(raw);
    expect(new BlockQueue(cbw).splicesReads).toBe(true);
    expect((cbw.begin() as Backend).spliceRead).toBeUndefined();
    await cbw.close();
  });

  it('O_DIRECT images do not splice', async () => {
    dir = rig.tempDir(tmpdir());
    const path = join(dir, 'disk.raw');
    writeFileSync(path, Buffer.alloc(MiB));
    const raw = await RawBackend.open(path, { direct: true }).catch(() => null);
    if (!raw) return; // the filesystem refuses O_DIRECT
    expect(raw.spliceRead).toBeUndefined();
    await raw.close();
  });
});

describe('send buffers', () => {
  it('unix-domain connections get a larger one; TCP keeps its own sizing', async () => {
    dir = rig.tempDir(tmpdir());
    const [a, b] = socketPair();
    expect(setUnixSendBuffer(a, 2 * MiB)).toBe(true);
    // SO_SNDBUFFORCE, or SO_SNDBUF up to net.core.wmem_max (the kernel doubles what it is given).
    const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    expect(sendBufferSize(a)).toBeGreaterThanOrEqual(Math.min(2 * 2 * MiB, 2 * wmemMax));
    closeFd(a);
    closeFd(b);
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const tcp = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
    await new Promise((r) => tcp.once('connect', r));
    const fd = socketFd(tcp);
    const tcpBefore = sendBufferSize(fd);
    expect(setUnixSendBuffer(fd, 2 * MiB)).toBe(false);
    expect(sendBufferSize(fd)).toBe(tcpBefore);
    tcp.destroy();
    srv.close();
  });
});

describe('the ring at teardown', () => {
  it('closes with a poll in flight on a socket whose peer never reads (the poll is cancelled)', () => {
    dir = rig.tempDir(tmpdir());
    const engine = UringEngine.create();
    expect(engine.canSplice).toBe(true);
    const [a, b] = socketPair();
    // Fill `a` until it has no room; nobody reads `b`.
    const s = new net.Socket({ fd: a, readable: false, writable: true });
    const chunk = Buffer.alloc(64 * 1024);
    while (s.write(chunk)) {
      /* until the socket's buffer is full */
    }
    const wait = engine.waitWritable(a);
    let settled = false;
    void wait.ready.then(() => (settled = true));
    engine.close(); // would block forever without the cancel
    expect(engine.inFlight).toBe(0);
    // A closed ring cannot wait: a writer gives up its splice rather than asking again and again.
    const late = engine.waitWritable(a);
    s.destroy();
    new net.Socket({ fd: b }).destroy();
    return Promise.all([wait.ready, late.ready]).then(([cancelled, closed]) => {
      expect(settled).toBe(true);
      expect(cancelled).toBe(true);
      expect(closed).toBe(false);
    });
  });
});
