/**
 * Spliced WRITE payloads (src/nbd/server/spliced-payload.ts): a large payload goes from the socket
 * into a pipe by reference and from the pipe into a raw image, with the socket paused meanwhile.
 * Driven over a socketpair the way the kernel's NBD connections are served, on a disk filesystem
 * and on tmpfs: the bytes and the framing of writes mixed with reads, a payload that trickles in
 * (the session waits on the ring), one in pieces too small for the pipe (the rest read into a
 * buffer), a peer that dies mid-payload, a session closed while it waits, and what the layers do
 * before a spliced write (write-intent marks, copy-before-write, the probed first sector).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { RawBackend } from '../../src/backends/raw.js';
import { openImage } from '../../src/backends/open.js';
import { BlockQueue } from '../../src/core/queue.js';
import { PassThroughLayer } from '../../src/core/layer.js';
import { pipes } from '../../src/io/pipes.js';
import { sharedEngine } from '../../src/io/open-port.js';
import { NBD_CMD, NBD_CMD_FLAG } from '../../src/nbd/wire/constants.js';
import { setUnixSendBuffer } from '../../src/sys/libc.js';
import { ScriptClient, clientFlags, optGo, request } from '../helpers/nbd-script.js';
import { ServedStack, image, waitFor } from '../helpers/served-stack.js';

const SIZE = 8 << 20;
const MiB = 1 << 20;
const KiB = 1024;

const DIRS = [
  ['a disk filesystem', tmpdir()],
  ['tmpfs', '/dev/shm'],
] as const;

let dir: string;
const rig = new ServedStack();

afterEach(async () => {
  vi.restoreAllMocks();
  await rig.close();
});

/** A raw image of `data` in a fresh directory under `base`, exported; `probed`: opened as a guess. */
async function rawImage(base: string, data: Buffer, probed = false): Promise<string> {
  dir = rig.tempDir(base);
  const path = join(dir, 'disk.raw');
  writeFileSync(path, data);
  await rig.export(await RawBackend.open(path, { probed }));
  return path;
}

/** The NBD request header of a WRITE (its payload to follow). */
function writeHeader(cookie: number, offset: number, length: number, flags = 0): Buffer {
  return request(NBD_CMD.WRITE, cookie, offset, length, flags);
}

/** `n` simple replies, any order: each cookie's error, and the data of the READs in `reads` (cookie → length). */
async function replies(c: ScriptClient, n: number, reads = new Map<number, number>()): Promise<Map<number, { error: number; data?: Buffer }>> {
  const got = new Map<number, { error: number; data?: Buffer }>();
  for (let i = 0; i < n; i++) {
    const head = await c.read(16, 20_000);
    const cookie = head.readUInt32BE(12);
    const error = head.readUInt32BE(4);
    const length = reads.get(cookie);
    got.set(cookie, { error, data: length !== undefined && error === 0 ? Buffer.from(await c.read(length, 20_000)) : undefined });
  }
  return got;
}

describe.each(DIRS)('spliced writes on %s', (_name, base) => {
  it.runIf(existsSync(base))('writes large payloads from pipes and small ones from buffers, every byte in place, framing kept', async () => {
    const data = image(SIZE);
    const path = await rawImage(base, data);
    expect(rig.stack!.queue.splicesWrites).toBe(true);
    const { c } = rig.kernelConnection();
    const outs = vi.spyOn(sharedEngine()!, 'spliceOut');
    const given = vi.spyOn(pipes, 'give');
    const expected = Buffer.from(data);
    // Unaligned offsets and lengths, the smallest spliced length and just under it, FUA, and a
    // 4 KiB write and a read between the large ones: all in one send, so headers, payloads and the
    // next headers share socket reads.
    const writes = [
      { offset: 0, length: MiB },
      { offset: 4095, length: 64 * KiB, flags: NBD_CMD_FLAG.FUA },
      { offset: 12_345, length: 64 * KiB - 1 },
      { offset: 3 * MiB + 17, length: 300_001 },
      { offset: 2 * MiB, length: 4 * KiB },
      { offset: SIZE - MiB, length: MiB },
    ];
    const frames: Buffer[] = [];
    writes.forEach((w, i) => {
      const payload = image(w.length, 0x1000 + i);
      payload.copy(expected, w.offset);
      frames.push(writeHeader(i + 1, w.offset, w.length, w.flags ?? 0), payload);
      if (i === 2) frames.push(request(NBD_CMD.READ, 99, 6 * MiB, 4 * KiB)); // a range no write touches
    });
    c.send(Buffer.concat(frames));
    const got = await replies(c, writes.length + 1, new Map([[99, 4 * KiB]]));
    for (let i = 1; i <= writes.length; i++) expect(got.get(i)!.error, `write ${i}`).toBe(0);
    expect(got.get(99)!.data!.equals(data.subarray(6 * MiB, 6 * MiB + 4 * KiB))).toBe(true);
    c.send(request(NBD_CMD.FLUSH, 50, 0, 0));
    expect((await c.readSimpleReply()).error).toBe(0);
    expect(readFileSync(path).equals(expected)).toBe(true);
    // Four of them at least 64 KiB: four pipes written out and given back.
    expect(outs.mock.calls.length).toBeGreaterThanOrEqual(4);
    expect(given).toHaveBeenCalledTimes(4);
    expect(pipes.inUse).toBe(0);
    // Reads see the writes.
    c.send(request(NBD_CMD.READ, 51, SIZE - MiB, MiB));
    expect((await c.readSimpleReply(MiB)).data.equals(expected.subarray(SIZE - MiB))).toBe(true);
  }, 60_000);
});

describe('spliced writes: the socket as it really is', () => {
  it('waits on the ring for a payload that trickles in, then takes the requests behind it', async () => {
    const data = image(SIZE);
    const path = await rawImage(tmpdir(), data);
    const { c } = rig.kernelConnection();
    const waits = vi.spyOn(sharedEngine()!, 'waitReadable');
    const payload = image(MiB, 0x77);
    c.send(Buffer.concat([writeHeader(1, MiB, MiB), payload.subarray(0, 100 * KiB)]));
    await waitFor(() => waits.mock.calls.length > 0);
    for (const [from, to] of [[100 * KiB, 300 * KiB], [300 * KiB, 301 * KiB], [301 * KiB, MiB]] as const) {
      await new Promise((r) => setTimeout(r, 30));
      c.send(payload.subarray(from, to));
    }
    // A request right behind the payload, in the same send as its last bytes. (Not overlapping
    // the WRITE: NBD does not order requests in flight together.)
    c.send(request(NBD_CMD.READ, 2, MiB - 8 * KiB, 8 * KiB));
    const got = await replies(c, 2, new Map([[2, 8 * KiB]]));
    expect(got.get(1)!.error).toBe(0);
    expect(got.get(2)!.data!.equals(data.subarray(MiB - 8 * KiB, MiB))).toBe(true);
    expect(waits.mock.calls.length).toBeGreaterThanOrEqual(2);
    expect(readFileSync(path).subarray(MiB, 2 * MiB).equals(payload)).toBe(true);
    expect(pipes.inUse).toBe(0);
  }, 60_000);

  it('reads the rest into a buffer when the payload comes in pieces too small for the pipe', async () => {
    const data = image(SIZE);
    const path = await rawImage(tmpdir(), data);
    const { c, peer } = rig.kernelConnection();
    const outs = vi.spyOn(sharedEngine()!, 'spliceOut');
    // Each send(2) of 1000 bytes is a piece of its own in the socket, and a slot of its own in the
    // pipe: a 1 MiB payload needs over a thousand, more than a pipe has. The peer's buffer is made
    // big enough to hold them all at once.
    setUnixSendBuffer(peer, 8 * MiB);
    const payload = image(MiB, 0x99);
    writeSync(peer, writeHeader(1, 2 * MiB, MiB));
    for (let at = 0; at < MiB; at += 1000) writeSync(peer, payload.subarray(at, Math.min(at + 1000, MiB)));
    expect((await c.readSimpleReply()).error).toBe(0);
    c.send(request(NBD_CMD.READ, 2, 2 * MiB, MiB));
    expect((await c.readSimpleReply(MiB)).data.equals(payload)).toBe(true);
    expect(outs).not.toHaveBeenCalled(); // written from the buffer
    expect(readFileSync(path).subarray(2 * MiB, 3 * MiB).equals(payload)).toBe(true);
    expect(pipes.inUse).toBe(0);
  }, 60_000);

  it('drops a payload cut short by the peer: the image is unchanged, no pipe or poll left, the daemon serves on', async () => {
    const data = image(SIZE);
    const path = await rawImage(tmpdir(), data);
    const { c } = rig.kernelConnection();
    const engine = sharedEngine()!;
    const waits = vi.spyOn(engine, 'waitReadable');
    const discarded = vi.spyOn(pipes, 'discard');
    c.send(Buffer.concat([writeHeader(1, 0, MiB), image(200 * KiB, 0x55)]));
    await waitFor(() => waits.mock.calls.length > 0);
    c.destroy();
    await waitFor(() => discarded.mock.calls.length > 0);
    await waitFor(() => engine.inFlight === 0);
    expect(pipes.inUse).toBe(0);
    expect(readFileSync(path).equals(data)).toBe(true);
    const { c: c2 } = rig.kernelConnection();
    const payload = image(MiB, 0x56);
    c2.send(Buffer.concat([writeHeader(2, 0, MiB), payload]));
    expect((await c2.readSimpleReply()).error).toBe(0);
    expect(readFileSync(path).subarray(0, MiB).equals(payload)).toBe(true);
  }, 60_000);

  it('closes a session that waits for a payload at once: the poll is cancelled and the pipe closed', async () => {
    await rawImage(tmpdir(), image(SIZE));
    const { c } = rig.kernelConnection();
    const engine = sharedEngine()!;
    const waits = vi.spyOn(engine, 'waitReadable');
    c.send(Buffer.concat([writeHeader(1, 0, MiB), image(200 * KiB)]));
    await waitFor(() => waits.mock.calls.length > 0);
    await rig.server!.close(); // the peer is still there, and never sends the rest
    await waitFor(() => engine.inFlight === 0);
    expect(pipes.inUse).toBe(0);
  }, 60_000);
});

describe('spliced writes through the layers', () => {
  it('marks persistent-bitmap bits and preserves a backup view’s old data before the pipe is written', async () => {
    const data = image(SIZE);
    await rawImage(tmpdir(), data);
    const stack = rig.stack!;
    await stack.bitmaps.add('b0');
    const view = stack.fleecing.begin();
    const { c } = rig.kernelConnection();
    const payload = image(MiB, 0x33);
    c.send(Buffer.concat([writeHeader(1, 5 * MiB, MiB), payload]));
    expect((await c.readSimpleReply()).error).toBe(0);
    expect(pipes.inUse).toBe(0);
    const bits = stack.bitmaps.bits('b0');
    const dirty = bits.extents(0, SIZE, 100).filter((e) => e.dirty);
    expect(dirty.map((e) => [e.offset, e.length])).toEqual([[5 * MiB, MiB]]);
    expect((await view.read(5 * MiB, MiB)).equals(data.subarray(5 * MiB, 6 * MiB))).toBe(true);
    expect((await stack.queue.read(5 * MiB, MiB)).equals(payload)).toBe(true);
    const stats = stack.stats.snapshot().write;
    expect([stats.count, stats.errors, stats.bytes]).toEqual([1, 0, MiB]);
    await stack.fleecing.end();
  }, 60_000);

  it('checks the first sector of a probed raw image: a qcow2 header is refused, other bytes are written', async () => {
    const data = image(SIZE);
    const path = await rawImage(tmpdir(), data, true);
    const { c } = rig.kernelConnection();
    const hostile = image(MiB, 0x44);
    hostile.write('QFI\xfb', 0, 'latin1');
    c.send(Buffer.concat([writeHeader(1, 0, MiB), hostile]));
    expect((await c.readSimpleReply()).error).not.toBe(0);
    expect(readFileSync(path).equals(data)).toBe(true);
    const benign = image(MiB, 0x45);
    c.send(Buffer.concat([writeHeader(2, 0, MiB), benign]));
    expect((await c.readSimpleReply()).error).toBe(0);
    expect(readFileSync(path).subarray(0, MiB).equals(benign)).toBe(true);
    expect(pipes.inUse).toBe(0);
    // Refused once (EPERM), written once; the pipes refused with ENOTSUP are not counted.
    const stats = rig.stack!.stats.snapshot().write;
    expect([stats.count, stats.errors]).toEqual([2, 1]);
  }, 60_000);

  it('a layer that does not say so stops spliced writes; so does a qcow2 image', async () => {
    dir = rig.tempDir(tmpdir());
    const path = join(dir, 'disk.raw');
    writeFileSync(path, Buffer.alloc(MiB));
    const raw = await RawBackend.open(path);
    expect(new BlockQueue(raw).splicesWrites).toBe(true);
    class Rot13 extends PassThroughLayer {
      override write(offset: number, data: Buffer): Promise<void> {
        return super.write(offset, data.map((x) => x ^ 13) as Buffer);
      }
    }
    expect(new BlockQueue(new Rot13(raw)).splicesWrites).toBe(false);
    await raw.close();
    const ro = await RawBackend.open(path, { readOnly: true });
    expect(ro.spliceWrite).toBeUndefined();
    await ro.close();
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'q.qcow2'), '8M']);
    const q = await openImage(join(dir, 'q.qcow2'), {});
    expect(q.spliceWrite).toBeUndefined();
    await q.close();
  });
});

describe('spliced writes: whose sockets', () => {
  it('a client connection receives payloads into buffers (only the kernel’s sockets splice)', async () => {
    const data = image(SIZE);
    const path = await rawImage(tmpdir(), data);
    const sock = join(dir, 's');
    await rig.server!.listenUnix(sock);
    const c = rig.adopt(await ScriptClient.connect(sock));
    await c.readGreeting();
    c.send(clientFlags());
    c.send(optGo('disk'));
    await c.readOptionReplies();
    const taken = vi.spyOn(pipes, 'take');
    const payload = image(MiB, 0x21);
    c.send(Buffer.concat([writeHeader(1, MiB, MiB), payload]));
    expect((await c.readSimpleReply()).error).toBe(0);
    expect(taken).not.toHaveBeenCalled();
    expect(readFileSync(path).subarray(MiB, 2 * MiB).equals(payload)).toBe(true);
  }, 60_000);
});
