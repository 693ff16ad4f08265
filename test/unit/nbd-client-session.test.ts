/**
 * NbdClient against scripted fake servers on a Unix socket: every server byte is written on its
 * own (one write per event-loop turn), so the client sees frames split at every byte.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { NBD_CMD, NBD_ERR, NBD_FLAG, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO, NBD_OPT, NBD_REP } from '../../src/nbd/wire/constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from '../../src/nbd/wire/handshake.js';
import { ChunkReader } from '../../src/nbd/wire/reader.js';
import {
  decodeRequest,
  encodeChunkBlockStatus,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeSimpleReply,
  type RequestHeader,
} from '../../src/nbd/wire/transmission.js';

const dir = mkdtempSync(join(tmpdir(), 'nbdd-fake-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The server's view of one connection: exact reads, byte-at-a-time writes. */
class FakeIo {
  private readonly reader = new ChunkReader();
  private wake: (() => void) | null = null;
  ended = false;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (d) => {
      this.reader.push(d);
      this.wake?.();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', () => undefined);
  }

  async read(n: number): Promise<Buffer> {
    while (this.reader.length < n) {
      if (this.ended) throw new Error(`client closed while the server waited for ${n} bytes`);
      await new Promise<void>((r) => (this.wake = r));
    }
    return n === 0 ? Buffer.alloc(0) : this.reader.consume(n);
  }

  async write(...bufs: Buffer[]): Promise<void> {
    for (const b of bufs) {
      for (let i = 0; i < b.length; i++) {
        this.socket.write(b.subarray(i, i + 1));
        await new Promise((r) => setImmediate(r));
      }
    }
  }

  async option(): Promise<{ option: number; data: Buffer }> {
    const { option, length } = decodeOptionHeader(await this.read(16));
    return { option, data: await this.read(length) };
  }

  async request(): Promise<RequestHeader> {
    return decodeRequest(await this.read(28));
  }
}

/** Serves one connection with `script`; resolves `done` with the script's outcome. */
async function fakeServer(script: (io: FakeIo) => Promise<void>): Promise<{ path: string; done: Promise<void> }> {
  const path = join(dir, `s${Math.random().toString(36).slice(2)}.sock`);
  let finish!: (p: Promise<void>) => void;
  const done = new Promise<Promise<void>>((r) => (finish = r)).then((p) => p);
  const server = net.createServer((socket) => {
    server.close();
    const io = new FakeIo(socket);
    finish(script(io).finally(() => socket.end()));
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { path, done };
}

async function expectErrno(p: Promise<unknown>, errno: number, message?: RegExp): Promise<void> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(NbddError);
  expect((err as NbddError).errno).toBe(errno);
  if (message) expect((err as NbddError).message).toMatch(message);
}

const SIZE = 4 * 1024 * 1024;
const FLAGS = NBD_FLAG.HAS_FLAGS | NBD_FLAG.SEND_FLUSH | NBD_FLAG.SEND_FUA;

describe('NbdClient negotiation', () => {
  it('falls back to EXPORT_NAME (with the 124 zero bytes) when GO is unsupported, then uses simple replies', async () => {
    const { path, done } = await fakeServer(async (io) => {
      await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE));
      expect((await io.read(4)).readUInt32BE(0)).toBe(1); // FIXED_NEWSTYLE, no NO_ZEROES (not offered)
      let o = await io.option();
      expect(o.option).toBe(NBD_OPT.STRUCTURED_REPLY);
      await io.write(encodeOptionError(o.option, NBD_REP.ERR_UNSUP, 'no'));
      o = await io.option();
      expect(o.option).toBe(NBD_OPT.GO);
      expect(decodeInfoRequest(o.data)).toEqual({ exportName: 'disk', infos: [NBD_INFO.NAME, NBD_INFO.DESCRIPTION, NBD_INFO.BLOCK_SIZE] });
      await io.write(encodeOptionError(o.option, NBD_REP.ERR_UNSUP, ''));
      o = await io.option();
      expect(o.option).toBe(NBD_OPT.EXPORT_NAME);
      expect(o.data.toString()).toBe('disk');
      await io.write(encodeExportNameReply(SIZE, FLAGS, false));
      const r = await io.request();
      expect(r).toMatchObject({ type: NBD_CMD.READ, offset: 512, length: 6, flags: 0 });
      await io.write(encodeSimpleReply(0, r.cookieHi, r.cookieLo), Buffer.from('abcdef'));
      const disc = await io.request();
      expect(disc.type).toBe(NBD_CMD.DISC);
    });
    const client = await NbdClient.connect({ kind: 'unix', path }, { exportName: 'disk', metaContexts: ['base:allocation'] });
    expect(client.info).toMatchObject({ entry: 'export-name', size: SIZE, flags: FLAGS, structuredReplies: false, minBlockSize: 1 });
    expect(client.info.contexts.size).toBe(0);
    expect((await client.read(512, 6)).toString()).toBe('abcdef');
    await client.close();
    await done;
  });

  it('negotiates structured replies, meta contexts and block sizes; splits and reassembles reads', async () => {
    const MAX = 8192;
    const { path, done } = await fakeServer(async (io) => {
      await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
      expect((await io.read(4)).readUInt32BE(0)).toBe(3);
      let o = await io.option();
      expect(o.option).toBe(NBD_OPT.STRUCTURED_REPLY);
      await io.write(encodeOptionReply(o.option, NBD_REP.ACK));
      o = await io.option();
      expect(o.option).toBe(NBD_OPT.SET_META_CONTEXT);
      expect(decodeMetaContextRequest(o.data)).toEqual({ exportName: '', queries: ['base:allocation', 'qemu:dirty-bitmap:b0', 'x:unknown'] });
      await io.write(
        encodeOptionReply(o.option, NBD_REP.META_CONTEXT, encodeRepMetaContext(7, 'base:allocation')),
        encodeOptionReply(o.option, NBD_REP.META_CONTEXT, encodeRepMetaContext(9, 'qemu:dirty-bitmap:b0')),
        encodeOptionReply(o.option, NBD_REP.ACK),
      );
      o = await io.option();
      expect(o.option).toBe(NBD_OPT.GO);
      await io.write(
        encodeOptionReply(o.option, NBD_REP.INFO, encodeInfoExport(SIZE, FLAGS | NBD_FLAG.SEND_DF)),
        encodeOptionReply(o.option, NBD_REP.INFO, encodeInfoBlockSize(512, 4096, MAX)),
        encodeOptionReply(o.option, NBD_REP.INFO, encodeInfoString(NBD_INFO.DESCRIPTION, 'fake disk')),
        encodeOptionReply(o.option, NBD_REP.ACK),
      );
      // Three READ pieces of at most MAX bytes arrive before any reply; answer them in reverse.
      const reads = [await io.request(), await io.request(), await io.request()];
      expect(reads.map((r) => [r.offset, r.length])).toEqual([
        [0, MAX],
        [MAX, MAX],
        [2 * MAX, 512],
      ]);
      for (const r of reads.reverse()) {
        const half = r.length / 2;
        await io.write(
          encodeChunkOffsetHole(r.cookieHi, r.cookieLo, false, r.offset + half, half),
          encodeChunkOffsetDataHeader(r.cookieHi, r.cookieLo, true, r.offset, half),
          Buffer.alloc(half, (r.offset / 512) & 0xff || 1),
        );
      }
      const bs = await io.request();
      expect(bs).toMatchObject({ type: NBD_CMD.BLOCK_STATUS, offset: 4096, length: 8192 });
      await io.write(
        encodeChunkBlockStatus(bs.cookieHi, bs.cookieLo, false, 9, [1024, 1, 1024, 0]),
        encodeChunkBlockStatus(bs.cookieHi, bs.cookieLo, true, 7, [8192, 3]),
      );
      await io.request(); // DISC
    });
    const client = await NbdClient.connect({ kind: 'unix', path }, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b0', 'x:unknown'] });
    expect(client.info).toMatchObject({ entry: 'go', structuredReplies: true, minBlockSize: 512, preferredBlockSize: 4096, maxPayload: MAX, description: 'fake disk' });
    expect([...client.info.contexts]).toEqual([
      ['base:allocation', 7],
      ['qemu:dirty-bitmap:b0', 9],
    ]);
    await expectErrno(client.read(100, 512), Errno.EINVAL, /aligned/);
    const data = await client.read(0, 2 * MAX + 512);
    for (const [offset, length] of [
      [0, MAX],
      [MAX, MAX],
      [2 * MAX, 512],
    ] as const) {
      const fill = (offset / 512) & 0xff || 1;
      expect(data.subarray(offset, offset + length / 2).equals(Buffer.alloc(length / 2, fill))).toBe(true);
      expect(data.subarray(offset + length / 2, offset + length).equals(Buffer.alloc(length / 2))).toBe(true);
    }
    const status = await client.blockStatus(4096, 8192);
    expect(status.get('base:allocation')).toEqual([{ length: 8192, flags: 3 }]);
    expect(status.get('qemu:dirty-bitmap:b0')).toEqual([
      { length: 1024, flags: 1 },
      { length: 1024, flags: 0 },
    ]);
    await client.close();
    await done;
  });

  it('maps a refused GO to ENOENT with the server message', async () => {
    const { path, done } = await fakeServer(async (io) => {
      await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
      await io.read(4);
      await io.option();
      await io.write(encodeOptionReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK));
      const o = await io.option();
      await io.write(encodeOptionError(o.option, NBD_REP.ERR_UNKNOWN, 'no such export: nope'));
    });
    await expectErrno(NbdClient.connect({ kind: 'unix', path }, { exportName: 'nope' }), Errno.ENOENT, /no such export: nope/);
    await done;
  });

  it('lists exports and aborts', async () => {
    const { path, done } = await fakeServer(async (io) => {
      await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
      await io.read(4);
      let o = await io.option();
      expect(o.option).toBe(NBD_OPT.LIST);
      await io.write(
        encodeOptionReply(o.option, NBD_REP.SERVER, encodeRepServer('a', 'first')),
        encodeOptionReply(o.option, NBD_REP.SERVER, encodeRepServer('b')),
        encodeOptionReply(o.option, NBD_REP.ACK),
      );
      o = await io.option();
      expect(o.option).toBe(NBD_OPT.ABORT);
      await io.write(encodeOptionReply(o.option, NBD_REP.ACK));
    });
    expect(await NbdClient.list({ kind: 'unix', path })).toEqual([
      { name: 'a', description: 'first' },
      { name: 'b', description: '' },
    ]);
    await done;
  });

  it('rejects an option reply longer than the limit before reading it', async () => {
    const { path, done } = await fakeServer(async (io) => {
      await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
      await io.read(4);
      await io.option();
      const header = encodeOptionReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK);
      header.writeUInt32BE(1 << 30, 16);
      await io.write(header);
    });
    await expectErrno(NbdClient.connect({ kind: 'unix', path }), Errno.EPROTO, /limit/);
    await done;
  });
});

/** A server that negotiates structured replies and GO, then runs `transmission`. */
async function transmissionServer(transmission: (io: FakeIo) => Promise<void>): Promise<{ path: string; done: Promise<void> }> {
  return fakeServer(async (io) => {
    await io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    await io.read(4);
    let o = await io.option();
    await io.write(encodeOptionReply(o.option, NBD_REP.ACK));
    o = await io.option();
    await io.write(encodeOptionReply(o.option, NBD_REP.INFO, encodeInfoExport(SIZE, FLAGS)), encodeOptionReply(o.option, NBD_REP.ACK));
    await transmission(io);
  });
}

describe('NbdClient transmission failures', () => {
  it('rejects every request in flight when the server closes mid-reply', async () => {
    const { path, done } = await transmissionServer(async (io) => {
      const a = await io.request();
      await io.request();
      await io.write(encodeChunkOffsetDataHeader(a.cookieHi, a.cookieLo, true, a.offset, a.length), Buffer.alloc(10));
      io.socket.destroy();
    });
    const client = await NbdClient.connect({ kind: 'unix', path });
    const reads = [client.read(0, 4096), client.read(4096, 4096)];
    await Promise.all(reads.map((r) => expectErrno(r, Errno.ECONNRESET)));
    await expectErrno(client.flush(), Errno.ECONNRESET);
    await done;
  });

  it('drops the connection on a reply for an unknown cookie (EPROTO)', async () => {
    const { path, done } = await transmissionServer(async (io) => {
      const r = await io.request();
      await io.write(encodeSimpleReply(0, r.cookieHi + 1, r.cookieLo));
    });
    const client = await NbdClient.connect({ kind: 'unix', path });
    await expectErrno(client.flush(), Errno.EPROTO, /unknown cookie/);
    await done;
  });

  it('drops the connection on a second reply for a cookie whose request completed, though its slot was reused (EPROTO)', async () => {
    const { path, done } = await transmissionServer(async (io) => {
      const first = await io.request();
      await io.write(encodeSimpleReply(0, first.cookieHi, first.cookieLo));
      const second = await io.request();
      expect(second.cookieLo).toBe(first.cookieLo); // the freed slot is taken again...
      expect(second.cookieHi).not.toBe(first.cookieHi); // ...under a new generation
      await io.write(encodeSimpleReply(0, first.cookieHi, first.cookieLo)); // the first one's, again
    });
    const client = await NbdClient.connect({ kind: 'unix', path });
    await client.flush();
    await expectErrno(client.flush(), Errno.EPROTO, /unknown cookie/);
    await done;
  });

  it('reports server errors per request and keeps the connection', async () => {
    const { path, done } = await transmissionServer(async (io) => {
      const w = await io.request();
      await io.read(w.length);
      const f = await io.request();
      await io.write(encodeSimpleReply(NBD_ERR.ENOSPC, w.cookieHi, w.cookieLo), encodeSimpleReply(0, f.cookieHi, f.cookieLo));
      await io.request(); // DISC
    });
    const client = await NbdClient.connect({ kind: 'unix', path });
    const write = client.write(0, Buffer.alloc(1000), { fua: true });
    const flush = client.flush();
    await expectErrno(write, Errno.ENOSPC);
    await flush;
    await expectErrno(client.trim(0, 512), Errno.ENOTSUP, /TRIM/);
    await client.close();
    await expectErrno(client.read(0, 1), Errno.ESHUTDOWN);
    await done;
  });
});
