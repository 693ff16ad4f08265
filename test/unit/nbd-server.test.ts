/**
 * The NBD server and its sessions, driven byte by byte by a scripted client over a real unix
 * socket, with a backend that can fail and stall on demand.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Errno } from '../../src/core/errors.js';
import { BlockQueue } from '../../src/core/queue.js';
import { NbdExport } from '../../src/nbd/server/export.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, NBD_OPT, NBD_REP, NBD_REPLY_TYPE } from '../../src/nbd/wire/constants.js';
import { decodeInfo, decodeRepMetaContext, encodeOption } from '../../src/nbd/wire/handshake.js';
import { socketPair } from '../../src/sys/libc.js';
import { GatedBackend, turns } from '../helpers/gated-backend.js';
import { TestBackend } from '../helpers/test-backend.js';
import { ScriptClient, clientFlags, optGo, optListMeta, optSetMeta, optStructured, request, type Reply } from '../helpers/nbd-script.js';

const SIZE = 1 << 20;
let dir: string;
let sock: string;
let server: NbdServer;
let backend: TestBackend;
/** Set by `start({ gated: true })`: the backend the queue drives, holding every call until released. */
let gate: GatedBackend;

async function start(opts: { readOnly?: boolean; maxConnections?: number; handshakeTimeoutMs?: number; idleTimeoutMs?: number; maxDepth?: number; gated?: boolean } = {}): Promise<void> {
  backend = new TestBackend(SIZE);
  gate = new GatedBackend(backend);
  if (!opts.gated) gate.gated = false;
  server = new NbdServer({ maxConnections: opts.maxConnections, handshakeTimeoutMs: opts.handshakeTimeoutMs, idleTimeoutMs: opts.idleTimeoutMs });
  server.addExport(new NbdExport({ name: 'disk', description: 'test disk', queue: new BlockQueue(opts.gated ? gate : backend, { maxDepth: opts.maxDepth }), readOnly: opts.readOnly }));
  await server.listenUnix(sock);
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'nbdd-srv-'));
  sock = join(dir, 's');
});

afterEach(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

/** Connects, negotiates structured replies + base:allocation, and GOes to 'disk'. */
async function connectGo(structured = true): Promise<ScriptClient> {
  const c = await ScriptClient.connect(sock);
  await c.readGreeting();
  c.send(clientFlags());
  if (structured) {
    c.send(optStructured());
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ACK);
    c.send(optSetMeta(['base:allocation', 'qemu:allocation-depth'], 'disk'));
    await c.readOptionReplies();
  }
  c.send(optGo('disk'));
  const replies = await c.readOptionReplies();
  expect(replies.at(-1)!.type).toBe(NBD_REP.ACK);
  return c;
}

const pattern = (n: number, seed: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff));

describe('negotiation', () => {
  beforeEach(() => start());

  it('greets with FIXED_NEWSTYLE|NO_ZEROES and answers GO with export info, name and block size', async () => {
    const c = await ScriptClient.connect(sock);
    expect(await c.readGreeting()).toBe(3);
    c.send(clientFlags());
    c.send(optGo('disk', [1, 2, 3]));
    const replies = await c.readOptionReplies();
    const infos = replies.filter((r) => r.type === NBD_REP.INFO).map((r) => decodeInfo(r.data));
    expect(infos).toContainEqual({ type: 0, size: SIZE, flags: expect.any(Number) });
    expect(infos).toContainEqual({ type: 1, name: 'disk' });
    expect(infos).toContainEqual({ type: 2, description: 'test disk' });
    expect(infos).toContainEqual({ type: 3, minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 });
    const exp = infos.find((i) => i.type === 0) as { flags: number };
    for (const f of [NBD_FLAG.HAS_FLAGS, NBD_FLAG.SEND_FLUSH, NBD_FLAG.SEND_FUA, NBD_FLAG.SEND_TRIM, NBD_FLAG.SEND_WRITE_ZEROES, NBD_FLAG.CAN_MULTI_CONN]) {
      expect(exp.flags & f).toBe(f);
    }
    expect(exp.flags & NBD_FLAG.READ_ONLY).toBe(0);
    c.destroy();
  });

  it('lists exports, refuses unknown ones with ERR_UNKNOWN, and serves the default export for ""', async () => {
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    c.send(clientFlags());
    c.send(encodeOption(NBD_OPT.LIST));
    const list = await c.readOptionReplies();
    expect(list.map((r) => r.type)).toEqual([NBD_REP.SERVER, NBD_REP.ACK]);
    c.send(optGo('nope'));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_UNKNOWN);
    c.send(optGo(''));
    expect((await c.readOptionReplies()).at(-1)!.type).toBe(NBD_REP.ACK);
    c.send(request(NBD_CMD.READ, 1, 0, 512));
    expect((await c.readSimpleReply(512)).error).toBe(0);
    c.destroy();
  });

  it('lists and selects meta contexts, with the qemu: wildcard on LIST only', async () => {
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    c.send(clientFlags());
    c.send(optListMeta([], 'disk'));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_INVALID); // structured replies first
    c.send(optStructured());
    await c.readOptionReply();
    c.send(optListMeta(['qemu:'], 'disk'));
    const listed = (await c.readOptionReplies()).filter((r) => r.type === NBD_REP.META_CONTEXT).map((r) => decodeRepMetaContext(r.data).name);
    expect(listed).toEqual(['qemu:allocation-depth']);
    c.send(optSetMeta(['qemu:', 'base:allocation', 'unknown:x'], 'disk'));
    const set = (await c.readOptionReplies()).filter((r) => r.type === NBD_REP.META_CONTEXT).map((r) => decodeRepMetaContext(r.data));
    expect(set).toEqual([{ id: 0, name: 'base:allocation' }]);
    c.destroy();
  });

  it('answers unknown and malformed options and keeps negotiating', async () => {
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    c.send(clientFlags());
    c.send(encodeOption(99));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_UNSUP);
    c.send(encodeOption(NBD_OPT.GO, Buffer.from([0, 0, 0, 9, 1])));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_INVALID);
    c.send(encodeOption(NBD_OPT.LIST, Buffer.from('x')));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_INVALID);
    c.send(encodeOption(NBD_OPT.STARTTLS));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_UNSUP);
    // An option longer than we buffer is skipped as it streams in, then refused.
    c.send(encodeOption(NBD_OPT.INFO, Buffer.alloc(200 * 1024, 1)));
    expect((await c.readOptionReply()).type).toBe(NBD_REP.ERR_TOO_BIG);
    c.send(optGo('disk'));
    expect((await c.readOptionReplies()).at(-1)!.type).toBe(NBD_REP.ACK);
    c.destroy();
  });

  it('closes on a bad option magic, unknown client flags, unknown EXPORT_NAME and ABORT, while serving others', async () => {
    const other = await connectGo();
    const bad = await ScriptClient.connect(sock);
    await bad.readGreeting();
    bad.send(clientFlags());
    const opt = encodeOption(NBD_OPT.LIST);
    opt[0] ^= 0xff;
    bad.send(opt);
    expect(await bad.closesWithin(2000)).toBe(true);

    const flags = await ScriptClient.connect(sock);
    await flags.readGreeting();
    flags.send(clientFlags(0x80));
    expect(await flags.closesWithin(2000)).toBe(true);

    const unknown = await ScriptClient.connect(sock);
    await unknown.readGreeting();
    unknown.send(clientFlags());
    unknown.send(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('nope')));
    expect(await unknown.closesWithin(2000)).toBe(true);

    const abort = await ScriptClient.connect(sock);
    await abort.readGreeting();
    abort.send(clientFlags());
    abort.send(encodeOption(NBD_OPT.ABORT));
    expect((await abort.readOptionReply()).type).toBe(NBD_REP.ACK);
    expect(await abort.closesWithin(2000)).toBe(true);

    other.send(request(NBD_CMD.READ, 5, 0, 4096));
    const r = await other.readReply();
    // The export reads as zeroes: one hole chunk.
    expect(r).toMatchObject({ kind: 'chunk', cookie: 5, done: true, chunk: { type: NBD_REPLY_TYPE.OFFSET_HOLE, offset: 0, size: 4096 } });
    other.destroy();
  });

  it('serves EXPORT_NAME with the 124 zero bytes unless NO_ZEROES', async () => {
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    c.send(clientFlags(1));
    c.send(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('disk')));
    const reply = await c.read(134);
    expect(reply.readBigUInt64BE(0)).toBe(BigInt(SIZE));
    expect(reply.subarray(10).every((b) => b === 0)).toBe(true);
    c.destroy();
  });

  it('gives up on a stream that ends mid-option without harming the server', async () => {
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    c.send(clientFlags());
    c.send(encodeOption(NBD_OPT.GO, Buffer.alloc(10)).subarray(0, 20));
    c.destroy();
    const ok = await connectGo();
    ok.destroy();
  });
});

describe('the whole conversation split at every byte', () => {
  beforeEach(() => start());

  it('gives the same replies however the client stream is cut', async () => {
    const data = pattern(1000, 3);
    const frames = [
      clientFlags(),
      optStructured(),
      optSetMeta(['base:allocation'], 'disk'),
      optGo('disk'),
      request(NBD_CMD.WRITE, 1, 4096, data.length, NBD_CMD_FLAG.FUA, data),
      request(NBD_CMD.FLUSH, 2, 0, 0),
      request(NBD_CMD.READ, 3, 4096, 1000),
      request(NBD_CMD.BLOCK_STATUS, 4, 0, 16384),
      // Requests in flight together may be reordered, so none of these overlap another's range.
      request(NBD_CMD.WRITE_ZEROES, 5, 32768, 4096, NBD_CMD_FLAG.NO_HOLE),
      request(NBD_CMD.TRIM, 6, 49152, 4096),
      request(NBD_CMD.DISC, 7, 0, 0),
    ];
    const script = Buffer.concat(frames);
    const run = async (cuts: number[]): Promise<Reply[]> => {
      backend.reset();
      const c = await ScriptClient.connect(sock);
      await c.readGreeting();
      await c.sendSplit(script, cuts);
      await c.readOptionReply(); // STRUCTURED_REPLY ack
      await c.readOptionReplies(); // META_CONTEXT + ack
      await c.readOptionReplies(); // GO infos + ack
      const replies: Reply[] = [];
      // The write of cookie 1 must complete before the read of cookie 3 is issued, so wait for it.
      for (let i = 0; i < 6; i++) replies.push(await c.readReply());
      expect(await c.closesWithin(2000)).toBe(true);
      return replies.sort((a, b) => a.cookie - b.cookie);
    };
    const expected = await run([]);
    expect(expected.map((r) => r.cookie)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(expected[2]).toMatchObject({ kind: 'chunk', chunk: { type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 4096, data } });
    expect(expected[3]).toMatchObject({ kind: 'chunk', chunk: { type: NBD_REPLY_TYPE.BLOCK_STATUS, contextId: 0, extents: [4096, 3, 4096, 0, 8192, 3] } });
    expect(backend.data.subarray(4096, 5096).equals(data)).toBe(true);
    // Every byte position is covered socketlessly (nbd-negotiation.test.ts); over the socket, cut
    // at and around each frame boundary and inside each frame.
    const cuts = new Set<number>();
    let at = 0;
    for (const f of frames) {
      for (const c of [at - 1, at, at + 1, at + Math.floor(f.length / 2)]) if (c > 0 && c < script.length) cuts.add(c);
      at += f.length;
    }
    for (const cut of [...cuts].sort((x, y) => x - y)) {
      expect(await run([cut]), `cut at ${cut}`).toEqual(expected);
    }
    expect(await run(Array.from({ length: script.length - 1 }, (_, i) => i + 1))).toEqual(expected);
  }, 120_000);
});

describe('transmission', () => {
  it('writes and reads back with simple replies, and reports block status', async () => {
    await start();
    const c = await connectGo(false);
    const data = pattern(65536, 9);
    c.send(request(NBD_CMD.WRITE, 1, 65536, data.length, 0, data));
    expect(await c.readSimpleReply()).toMatchObject({ error: 0, cookie: 1 });
    c.send(request(NBD_CMD.READ, 2, 65536, data.length));
    const r = await c.readSimpleReply(data.length);
    expect(r.data.equals(data)).toBe(true);
    expect(backend.data.subarray(65536, 131072).equals(data)).toBe(true);
    c.destroy();
  });

  it('answers bad requests with the spec errors and keeps the connection', async () => {
    await start();
    const c = await connectGo(false);
    const cases: [Buffer, number][] = [
      [request(42, 1, 0, 0), 22], // unknown command
      [request(NBD_CMD.READ, 2, 0, 512, NBD_CMD_FLAG.NO_HOLE), 22], // flag not valid for READ
      [request(NBD_CMD.READ, 3, 0, 512, NBD_CMD_FLAG.DF), 22], // DF without structured replies
      [request(NBD_CMD.READ, 4, SIZE - 256, 512), 22], // past the end
      [request(NBD_CMD.WRITE, 5, SIZE - 256, 512, 0, Buffer.alloc(512)), 28], // write past the end: ENOSPC, payload consumed
      [request(NBD_CMD.TRIM, 6, SIZE, 1), 28],
      [request(NBD_CMD.READ, 7, 0, 33 * 1024 * 1024), 22], // larger than the maximum payload
      [request(NBD_CMD.BLOCK_STATUS, 8, 0, 512), 22], // no contexts negotiated
      [request(NBD_CMD.READ, 10, 2 ** 60, 512), 22], // offset past 2^53: EINVAL, not a disconnect
      [beyond53(request(NBD_CMD.WRITE, 11, 0, 512, 0, Buffer.alloc(512))), 22], // 2^64 - 512, payload consumed
      [request(NBD_CMD.READ, 12, 0, 0), 0], // zero length: success, no data
      [request(NBD_CMD.READ, 9, 0, 512), 0],
    ];
    for (const [frame, error] of cases) {
      c.send(frame);
      const cookie = frame.readUInt32BE(12);
      const r = await c.readSimpleReply(error === 0 ? frame.readUInt32BE(24) : 0);
      expect({ cookie: r.cookie, error: r.error }).toEqual({ cookie, error });
    }
    c.destroy();
  });

  it('refuses writes on a read-only export with EPERM and leaves the data alone', async () => {
    await start({ readOnly: true });
    const c = await connectGo(false);
    c.send(request(NBD_CMD.WRITE, 1, 0, 4096, 0, Buffer.alloc(4096, 0xaa)));
    c.send(request(NBD_CMD.WRITE_ZEROES, 2, 0, 4096));
    c.send(request(NBD_CMD.TRIM, 3, 0, 4096));
    c.send(request(NBD_CMD.READ, 4, 0, 16));
    expect((await c.readSimpleReply()).error).toBe(1);
    expect((await c.readSimpleReply()).error).toBe(1);
    expect((await c.readSimpleReply()).error).toBe(1);
    expect((await c.readSimpleReply(16)).error).toBe(0);
    expect(backend.calls.filter((x) => x.op !== 'read')).toEqual([]);
    c.destroy();
  });

  it('turns backend failures into error replies with the mapped errno', async () => {
    await start();
    const c = await connectGo();
    backend.failNext.read = Errno.EIO;
    c.send(request(NBD_CMD.READ, 1, 0, 4096));
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 1, done: true, chunk: { type: NBD_REPLY_TYPE.ERROR, error: 5 } });
    backend.failNext.write = Errno.ENOSPC;
    c.send(request(NBD_CMD.WRITE, 2, 0, 4, 0, Buffer.from('abcd')));
    expect(await c.readReply()).toMatchObject({ kind: 'simple', cookie: 2, error: 28 });
    backend.failNext.flush = Errno.EIO;
    c.send(request(NBD_CMD.FLUSH, 3, 0, 0));
    expect(await c.readReply()).toMatchObject({ kind: 'simple', cookie: 3, error: 5 });
    c.send(request(NBD_CMD.READ, 4, 0, 4));
    // The failed write left zeroes: answered as a hole.
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 4, chunk: { type: NBD_REPLY_TYPE.OFFSET_HOLE, size: 4 } });
    c.destroy();
  });

  it('answers ENOTSUP only to FAST_ZERO, and EINVAL to an ENOTSUP elsewhere (as nbdkit does)', async () => {
    await start();
    const c = await connectGo();
    backend.failNext.writeZeroes = Errno.ENOTSUP;
    c.send(request(NBD_CMD.WRITE_ZEROES, 1, 0, 4096, NBD_CMD_FLAG.FAST_ZERO));
    expect(await c.readReply()).toMatchObject({ kind: 'simple', cookie: 1, error: 95 });
    backend.failNext.trim = Errno.ENOTSUP;
    c.send(request(NBD_CMD.TRIM, 2, 0, 4096));
    expect(await c.readReply()).toMatchObject({ kind: 'simple', cookie: 2, error: 22 });
    backend.failNext.write = Errno.EROFS;
    c.send(request(NBD_CMD.WRITE, 3, 0, 4, 0, Buffer.from('abcd')));
    expect(await c.readReply()).toMatchObject({ kind: 'simple', cookie: 3, error: 1 });
    c.destroy();
  });

  it('answers large sparse reads with OFFSET_HOLE chunks unless DF is set', async () => {
    await start();
    const c = await connectGo();
    backend.data.fill(0x5a, 64 * 1024, 68 * 1024);
    c.send(request(NBD_CMD.WRITE, 1, 64 * 1024, 4096, 0, Buffer.alloc(4096, 0x5a)));
    await c.readReply();
    c.send(request(NBD_CMD.READ, 2, 0, 128 * 1024));
    const chunks: Reply[] = [];
    for (;;) {
      const r = await c.readReply();
      chunks.push(r);
      if (r.kind === 'chunk' && r.done) break;
    }
    expect(chunks.map((r) => (r.kind === 'chunk' ? r.chunk.type : -1))).toEqual([NBD_REPLY_TYPE.OFFSET_HOLE, NBD_REPLY_TYPE.OFFSET_DATA, NBD_REPLY_TYPE.OFFSET_HOLE]);
    expect(chunks[0]).toMatchObject({ chunk: { offset: 0, size: 64 * 1024 } });
    expect(chunks[1]).toMatchObject({ chunk: { offset: 64 * 1024, data: Buffer.alloc(4096, 0x5a) } });
    c.send(request(NBD_CMD.READ, 3, 0, 128 * 1024, NBD_CMD_FLAG.DF));
    const single = await c.readReply();
    expect(single).toMatchObject({ kind: 'chunk', done: true, chunk: { type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 0 } });
    c.destroy();
  });

  it('answers a small read of zeroes with one OFFSET_HOLE chunk, data with OFFSET_DATA, and zeroes under DF as data', async () => {
    await start();
    const c = await connectGo();
    c.send(request(NBD_CMD.WRITE, 1, 8192, 4096, 0, Buffer.alloc(4096, 0x77)));
    await c.readReply();
    c.send(request(NBD_CMD.READ, 2, 0, 4096));
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 2, done: true, chunk: { type: NBD_REPLY_TYPE.OFFSET_HOLE, offset: 0, size: 4096 } });
    // Zeroes then data in one read: not all zero, so data (the test stops at the data, not before).
    c.send(request(NBD_CMD.READ, 3, 4096, 8192));
    const mixed = await c.readReply();
    expect(mixed).toMatchObject({ kind: 'chunk', cookie: 3, done: true, chunk: { type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 4096 } });
    expect(mixed.kind === 'chunk' && mixed.chunk.type === NBD_REPLY_TYPE.OFFSET_DATA ? mixed.chunk.data : null).toEqual(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 0x77)]));
    // A single zero byte after data counts as data too.
    c.send(request(NBD_CMD.READ, 4, 12287, 2));
    expect(await c.readReply()).toMatchObject({ cookie: 4, chunk: { type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 12287 } });
    c.send(request(NBD_CMD.READ, 5, 0, 4096, NBD_CMD_FLAG.DF));
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 5, done: true, chunk: { type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 0, data: Buffer.alloc(4096) } });
    c.destroy();
  });

  it('block status honours REQ_ONE and reports allocation depth', async () => {
    await start();
    const c = await connectGo();
    c.send(request(NBD_CMD.WRITE, 1, 8192, 4096, 0, Buffer.alloc(4096, 1)));
    await c.readReply();
    c.send(request(NBD_CMD.BLOCK_STATUS, 2, 0, 20000, NBD_CMD_FLAG.REQ_ONE));
    const a = await c.readReply();
    const b = await c.readReply();
    expect(a).toMatchObject({ done: false, chunk: { contextId: 0, extents: [8192, 3] } });
    expect(b).toMatchObject({ done: true, chunk: { contextId: 1, extents: [8192, 0] } });
    c.send(request(NBD_CMD.BLOCK_STATUS, 3, 4096, 10000));
    expect(await c.readReply()).toMatchObject({ chunk: { extents: [4096, 3, 4096, 0, 1808, 3] } });
    expect(await c.readReply()).toMatchObject({ chunk: { extents: [4096, 0, 4096, 1, 1808, 0] } });
    c.destroy();
  });

  it('answers a zero-length READ with structured replies as NONE with DONE (OFFSET_DATA needs data)', async () => {
    await start();
    const c = await connectGo(true);
    c.send(request(NBD_CMD.READ, 1, 4096, 0));
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 1, done: true, chunk: { type: 0 } });
    c.send(request(NBD_CMD.READ, 2, 0, 4)); // and the connection goes on
    expect(await c.readReply()).toMatchObject({ kind: 'chunk', cookie: 2, done: true });
    c.destroy();
  });

  it('answers the requests before a garbage frame, then closes', async () => {
    await start({ gated: true });
    const c = await connectGo(false);
    const garbage = request(NBD_CMD.READ, 9, 0, 512);
    garbage.writeUInt32BE(0xdeadbeef, 0);
    c.send(Buffer.concat([request(NBD_CMD.WRITE, 1, 0, 4, 0, Buffer.from('abcd')), request(NBD_CMD.READ, 2, 0, 4), garbage]));
    await new Promise((r) => setTimeout(r, 50)); // the garbage has arrived while both are held
    gate.open();
    const replies = [await c.readSimpleReply(), await c.readSimpleReply(4)];
    expect(replies.map((r) => [r.cookie, r.error])).toEqual([[1, 0], [2, 0]]);
    expect(replies[1]!.data.toString()).toBe('abcd');
    expect(await c.closesWithin(2000)).toBe(true);
  });

  it('closes the connection on a bad request magic and on a write larger than it will buffer', async () => {
    await start();
    const c = await connectGo(false);
    const frame = request(NBD_CMD.READ, 1, 0, 512);
    frame.writeUInt32BE(0x12345678, 0);
    c.send(frame);
    expect(await c.closesWithin(2000)).toBe(true);
    const d = await connectGo(false);
    d.send(request(NBD_CMD.WRITE, 2, 0, 64 * 1024 * 1024));
    expect((await d.readSimpleReply()).error).toBe(22);
    expect(await d.closesWithin(2000)).toBe(true);
  });

  it('completes a FLUSH only after the writes before it and flushes the backend after them', async () => {
    await start({ gated: true });
    const c = await connectGo(false);
    c.send(Buffer.concat([request(NBD_CMD.WRITE, 1, 0, 4, 0, Buffer.from('aaaa')), request(NBD_CMD.WRITE, 2, 8, 4, 0, Buffer.from('bbbb')), request(NBD_CMD.FLUSH, 3, 0, 0)]));
    const w1 = await gate.waitFor('write', (x) => x.offset === 0);
    const w2 = await gate.waitFor('write', (x) => x.offset === 8);
    // Both writes are held: the backend must not see the flush yet, however long we wait.
    await new Promise((r) => setTimeout(r, 50));
    await turns();
    expect(gate.ops()).toEqual(['write', 'write']);
    w2.release();
    expect((await c.readSimpleReply()).cookie).toBe(2);
    await turns();
    expect(gate.ops()).not.toContain('flush');
    w1.release();
    expect((await c.readSimpleReply()).cookie).toBe(1);
    const flush = await gate.waitFor('flush');
    expect(gate.held.filter((x) => x.op === 'write')).toEqual([]);
    flush.release();
    expect(await c.readSimpleReply()).toMatchObject({ cookie: 3, error: 0 });
    expect(backend.data.subarray(0, 12).toString()).toBe('aaaa\0\0\0\0bbbb');
    c.destroy();
  });

  it('emulates FUA as write then flush on a backend without native FUA', async () => {
    await start();
    const c = await connectGo(false);
    c.send(request(NBD_CMD.WRITE, 1, 0, 4, NBD_CMD_FLAG.FUA, Buffer.from('abcd')));
    await c.readSimpleReply();
    expect(backend.calls.map((x) => x.op)).toEqual(['write', 'flush']);
    c.destroy();
  });

  it('finishes in-flight requests on DISC before closing', async () => {
    await start();
    const c = await connectGo(false);
    backend.delayMs = 50;
    c.send(Buffer.concat([request(NBD_CMD.WRITE, 1, 0, 4, 0, Buffer.from('wxyz')), request(NBD_CMD.DISC, 2, 0, 0), request(NBD_CMD.READ, 3, 0, 4)]));
    expect(await c.readSimpleReply()).toMatchObject({ cookie: 1, error: 0 });
    expect(await c.closesWithin(2000)).toBe(true);
    expect(backend.data.subarray(0, 4).toString()).toBe('wxyz');
    expect(backend.calls.filter((x) => x.op === 'read')).toEqual([]);
  });
});

describe('server limits and shutdown', () => {
  it('drops a client that does not finish negotiation in time', async () => {
    await start({ handshakeTimeoutMs: 200 });
    const c = await ScriptClient.connect(sock);
    await c.readGreeting();
    expect(await c.closesWithin(2000)).toBe(true);
  });

  it('--idle-timeout: idle clients are closed and free their slots; busy ones and slow requests are not', async () => {
    await start({ idleTimeoutMs: 300, maxConnections: 3, gated: true });
    gate.gated = false;
    const idle = [await connectGo(false), await connectGo(false)];
    const busy = await connectGo(false);
    const ticker = setInterval(() => busy.send(request(NBD_CMD.READ, 7, 0, 512)), 50);
    // A request that takes longer than the timeout keeps its connection: nothing idles while in flight.
    gate.gated = true;
    idle[1]!.send(request(NBD_CMD.READ, 8, 0, 512));
    try {
      expect(await idle[0]!.closesWithin(1500)).toBe(true);
      expect(await idle[1]!.closesWithin(200)).toBe(false);
      gate.open();
      expect((await idle[1]!.readSimpleReply(512)).error).toBe(0);
      expect(await idle[1]!.closesWithin(1500)).toBe(true);
      const fresh = await connectGo(false); // the freed slot is usable
      fresh.send(request(NBD_CMD.READ, 9, 0, 512));
      expect((await fresh.readSimpleReply(512)).error).toBe(0);
      fresh.destroy();
    } finally {
      clearInterval(ticker);
    }
    expect(await busy.closesWithin(10)).toBe(false);
    busy.destroy();
  });

  it('refuses connections past the cap and accepts again when one leaves', async () => {
    await start({ maxConnections: 1 });
    const a = await connectGo(false);
    const b = await ScriptClient.connect(sock);
    expect(await b.closesWithin(2000)).toBe(true);
    a.destroy();
    await a.closed;
    await new Promise((r) => setTimeout(r, 50));
    const c = await connectGo(false);
    c.destroy();
  });

  it('applies backpressure: a client pipelining past the queue depth is still fully served', async () => {
    await start({ maxDepth: 4, gated: true });
    const c = await connectGo(false);
    const frames = Array.from({ length: 64 }, (_, i) => request(NBD_CMD.WRITE, i + 1, i * 4096, 4096, 0, Buffer.alloc(4096, i)));
    c.send(Buffer.concat(frames));
    const cookies = new Set<number>();
    let mostHeld = 0;
    while (cookies.size < 64) {
      await gate.waitFor('write');
      // Let the session read whatever it is willing to: with a depth of 4 it must stop at 4.
      await new Promise((r) => setTimeout(r, 5));
      await turns();
      mostHeld = Math.max(mostHeld, gate.held.length);
      expect(gate.held.length).toBeLessThanOrEqual(4);
      const n = gate.release();
      for (let i = 0; i < n; i++) cookies.add((await c.readSimpleReply()).cookie);
    }
    expect(mostHeld).toBe(4);
    expect(cookies.size).toBe(64);
    expect(backend.data[63 * 4096]).toBe(63);
    c.destroy();
  });

  it('on close, answers requests in flight, then closes the backend', async () => {
    await start();
    const c = await connectGo(false);
    backend.delayMs = 100;
    c.send(request(NBD_CMD.WRITE, 1, 0, 4, 0, Buffer.from('1234')));
    await new Promise((r) => setTimeout(r, 20));
    const closing = server.close();
    expect(await c.readSimpleReply()).toMatchObject({ cookie: 1, error: 0 });
    await closing;
    expect(backend.closed).toBe(true);
    expect(await c.closesWithin(2000)).toBe(true);
  });
});


/** Serves one end of a socketpair as the kernel's connections are served; the test speaks on the other. */
async function kernelPair(): Promise<ScriptClient> {
  await start();
  const [peer, ours] = socketPair();
  server.serveTransmission(ours, 'disk');
  return ScriptClient.over(new net.Socket({ fd: peer, readable: true, writable: true }));
}

/** A client connection the listener accepted, negotiated to simple replies. */
async function acceptedPlain(): Promise<ScriptClient> {
  await start();
  return connectGo(false);
}

describe.each([
  ['kernel sockets (serveTransmission over a socketpair fd)', kernelPair],
  ['client connections (accepted by the listener, moved to a socket with onread)', acceptedPlain],
])('%s: reads land in a slab or in the payload', (_name, kernelPair) => {

  it('serves small and large writes and reads however the stream is cut', async () => {
    // Payloads below and above the size that gets its own buffer (64 KiB), one straddling it.
    const writes = [
      { offset: 0, data: pattern(4096, 1) },
      { offset: 8192, data: pattern(65536, 2) },
      { offset: 131072, data: pattern(300_001, 3) },
      { offset: 524288, data: pattern(1000, 4) },
    ];
    const script = Buffer.concat([
      ...writes.map((w, i) => request(NBD_CMD.WRITE, i + 1, w.offset, w.data.length, 0, w.data)),
      request(NBD_CMD.FLUSH, 10, 0, 0),
    ]);
    const c = await kernelPair();
    // Cuts inside headers, inside payloads, and right at their boundaries; then byte runs.
    const cuts = [5, 28, 29, 4096 + 28, 4096 + 56, 4096 + 60, 70_000, 70_001, 200_000, script.length - 1030, script.length - 3];
    for (const split of [[], cuts, Array.from({ length: 200 }, (_, i) => 131_000 + i * 7)]) {
      backend.reset();
      await c.sendSplit(script, split);
      const cookies = [];
      for (let i = 0; i <= writes.length; i++) {
        const r = await c.readSimpleReply();
        expect(r.error).toBe(0);
        cookies.push(r.cookie);
      }
      expect(cookies.sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 10]);
      for (const w of writes) expect(backend.data.subarray(w.offset, w.offset + w.data.length).equals(w.data)).toBe(true);
      for (const [i, w] of writes.entries()) {
        c.send(request(NBD_CMD.READ, 20 + i, w.offset, w.data.length));
        const r = await c.readSimpleReply(w.data.length);
        expect({ cookie: r.cookie, same: r.data.equals(w.data) }).toEqual({ cookie: 20 + i, same: true });
      }
    }
    c.destroy();
  }, 60_000);

  it('keeps the bytes of a small write in flight when the next reads come in', async () => {
    // The small payload is a view of the read it came in; the large write's header and first
    // payload bytes, read after it, are copied out and their room is reused (ReadSlab.reuse):
    // that must never be the small payload's room while its write is still waiting.
    const c = await kernelPair();
    backend.delayMs = 50;
    const small = pattern(1000, 6); // below POOL_MIN: a view of the slab
    const big = pattern(200_000, 7);
    c.send(request(NBD_CMD.WRITE, 1, 0, small.length, 0, small));
    await new Promise((r) => setTimeout(r, 10));
    for (let i = 0; i < 3; i++) {
      c.send(request(NBD_CMD.WRITE, 2 + i, 65536 + i * 262144, big.length, 0, big));
      await new Promise((r) => setTimeout(r, 5));
    }
    const cookies = [];
    for (let i = 0; i < 4; i++) cookies.push((await c.readSimpleReply()).cookie);
    expect(cookies.sort()).toEqual([1, 2, 3, 4]);
    expect(backend.data.subarray(0, small.length).equals(small)).toBe(true);
    for (let i = 0; i < 3; i++) expect(backend.data.subarray(65536 + i * 262144, 65536 + i * 262144 + big.length).equals(big)).toBe(true);
    c.destroy();
  });

  it('keeps framing after a refused large write, and many pipelined writes all land', async () => {
    const c = await kernelPair();
    const big = pattern(200_000, 5);
    c.send(request(NBD_CMD.WRITE, 1, SIZE - 4096, big.length, 0, big)); // past the end: ENOSPC, payload skipped
    expect(await c.readSimpleReply()).toMatchObject({ cookie: 1, error: 28 });
    const frames = Array.from({ length: 300 }, (_, i) => request(NBD_CMD.WRITE, 100 + i, i * 3000, 3000, 0, Buffer.alloc(3000, i & 0xff)));
    frames.push(request(NBD_CMD.WRITE, 99, 900_000, 100_000, 0, big.subarray(0, 100_000)));
    c.send(Buffer.concat(frames));
    const cookies = new Set<number>();
    for (let i = 0; i < frames.length; i++) cookies.add((await c.readSimpleReply()).cookie);
    expect(cookies.size).toBe(frames.length);
    for (let i = 0; i < 300; i++) expect(backend.data[i * 3000 + 2999]).toBe(i & 0xff);
    expect(backend.data.subarray(900_000, 1_000_000).equals(big.subarray(0, 100_000))).toBe(true);
    c.destroy();
  });
});

/** The frame with its offset set to 2^64 - 512, which no JS number holds exactly. */
function beyond53(frame: Buffer): Buffer {
  frame.writeUInt32BE(0xffffffff, 16);
  frame.writeUInt32BE(0xfffffe00, 20);
  return frame;
}
