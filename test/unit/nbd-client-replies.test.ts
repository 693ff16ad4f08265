/**
 * The client's reply parser and READ reassembly, fed streams built with the wire encoders and
 * split at every byte.
 */
import { describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { PendingReply, ReplyParser, type ReplyTarget } from '../../src/nbd/client/replies.js';
import { NBD_CMD, NBD_ERR, NBD_REPLY_FLAG_DONE, NBD_STRUCTURED_REPLY_MAGIC } from '../../src/nbd/wire/constants.js';
import { ProtocolError } from '../../src/nbd/wire/handshake.js';
import { ChunkReader } from '../../src/nbd/wire/reader.js';
import {
  encodeChunkBlockStatus,
  encodeChunkError,
  encodeChunkNone,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeSimpleReply,
} from '../../src/nbd/wire/transmission.js';

class Harness implements ReplyTarget {
  readonly pending = new Map<number, PendingReply>();
  readonly finished: PendingReply[] = [];
  readonly reader = new ChunkReader();
  readonly parser = new ReplyParser(this);

  add(type: number, cookie: number, offset: number, length: number): PendingReply {
    const r = new PendingReply(type, offset, length, 0, cookie, type === NBD_CMD.READ ? Buffer.alloc(length, 0xee) : null);
    this.pending.set(cookie, r);
    return r;
  }
  lookup(hi: number, lo: number): PendingReply | undefined {
    return hi === 0 ? this.pending.get(lo) : undefined;
  }
  done(reply: PendingReply): void {
    this.pending.delete(reply.cookieLo);
    this.finished.push(reply);
  }
  feed(bytes: Buffer, pieces: number[]): void {
    let at = 0;
    for (const end of [...pieces, bytes.length]) {
      this.reader.push(bytes.subarray(at, end));
      this.parser.pump(this.reader);
      at = end;
    }
  }
}

const data = (offset: number, n: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (offset + i) % 251));

/** Interleaved replies to five requests, chunks of different requests mixed. */
function session(): { setup: (h: Harness) => void; bytes: Buffer } {
  const bytes = Buffer.concat([
    encodeChunkOffsetDataHeader(0, 1, false, 1100, 200),
    data(1100, 200),
    encodeChunkBlockStatus(0, 2, false, 0, [4096, 3, 8192, 0]),
    encodeChunkOffsetHole(0, 1, false, 1000, 100),
    encodeSimpleReply(0, 0, 3),
    encodeChunkBlockStatus(0, 2, true, 1, [12288, 1]),
    encodeChunkNone(0, 1),
    encodeSimpleReply(0, 0, 4),
    data(7, 5),
    encodeChunkError(0, 5, true, NBD_ERR.EIO, 'disk on fire'),
    encodeSimpleReply(NBD_ERR.EPERM, 0, 6),
  ]);
  const setup = (h: Harness): void => {
    h.add(NBD_CMD.READ, 1, 1000, 300);
    h.add(NBD_CMD.BLOCK_STATUS, 2, 0, 12288);
    h.add(NBD_CMD.WRITE, 3, 0, 512);
    h.add(NBD_CMD.READ, 4, 7, 5);
    h.add(NBD_CMD.READ, 5, 0, 4096);
    h.add(NBD_CMD.WRITE, 6, 0, 512);
  };
  return { setup, bytes };
}

function checkSession(h: Harness): void {
  expect(h.finished.map((r) => r.cookieLo)).toEqual([3, 2, 1, 4, 5, 6]);
  expect(h.parser.idle).toBe(true);
  expect(h.pending.size).toBe(0);
  const byCookie = new Map(h.finished.map((r) => [r.cookieLo, r]));
  const read = byCookie.get(1)!;
  read.check();
  expect(read.data!.equals(Buffer.concat([Buffer.alloc(100), data(1100, 200)]))).toBe(true);
  const status = byCookie.get(2)!;
  status.check();
  expect(status.status).toEqual(new Map([[0, [4096, 3, 8192, 0]], [1, [12288, 1]]]));
  byCookie.get(3)!.check();
  expect(byCookie.get(4)!.data!.equals(data(7, 5))).toBe(true);
  expect(() => byCookie.get(5)!.check()).toThrow(/disk on fire/);
  expect(errnoOf(() => byCookie.get(5)!.check())).toBe(Errno.EIO);
  expect(errnoOf(() => byCookie.get(6)!.check())).toBe(Errno.EPERM);
}

function errnoOf(f: () => void): number | undefined {
  try {
    f();
  } catch (err) {
    return err instanceof NbddError ? err.errno : undefined;
  }
  return undefined;
}

describe('ReplyParser', () => {
  it('parses interleaved simple and structured replies fed one byte at a time', () => {
    const { setup, bytes } = session();
    const h = new Harness();
    setup(h);
    h.feed(bytes, Array.from({ length: bytes.length - 1 }, (_, i) => i + 1));
    checkSession(h);
  });

  it('parses the same stream split in two at every position', () => {
    const { setup, bytes } = session();
    for (let split = 0; split <= bytes.length; split++) {
      const h = new Harness();
      setup(h);
      h.feed(bytes, [split]);
      checkSession(h);
    }
  });

  it('keeps no view of the bytes it parsed, so the socket read buffer can take the next read', () => {
    // ReadSlab.deliver reuses a read's room only when the reader lent none of it (`lent`).
    const { setup, bytes } = session();
    const h = new Harness();
    setup(h);
    h.feed(bytes, []);
    checkSession(h);
    expect(h.reader.length).toBe(0);
    expect(h.reader.lent).toBe(0);
  });

  it('rejects a READ chunk outside the request before reading its data', () => {
    const h = new Harness();
    h.add(NBD_CMD.READ, 1, 1000, 300);
    const header = encodeChunkOffsetDataHeader(0, 1, true, 1250, 100);
    // The header alone (its length, 8 + 100, fits the request) passes; the offset then fails.
    expect(() => h.feed(header, [])).toThrow(ProtocolError);
    const h2 = new Harness();
    h2.add(NBD_CMD.READ, 1, 1000, 300);
    const tooLong = encodeChunkOffsetDataHeader(0, 1, true, 1000, 301).subarray(0, 20);
    expect(() => h2.feed(tooLong, [])).toThrow(/length out of range/);
  });

  it('rejects overlapping READ chunks and reports missing coverage as EPROTO', () => {
    const h = new Harness();
    h.add(NBD_CMD.READ, 1, 0, 100);
    const first = Buffer.concat([encodeChunkOffsetDataHeader(0, 1, false, 0, 60), data(0, 60)]);
    h.feed(first, []);
    expect(() => h.feed(encodeChunkOffsetHole(0, 1, true, 50, 20), [])).toThrow(/overlaps/);

    const g = new Harness();
    g.add(NBD_CMD.READ, 1, 0, 100);
    g.feed(Buffer.concat([encodeChunkOffsetHole(0, 1, false, 0, 40), encodeChunkOffsetHole(0, 1, true, 60, 40)]), []);
    expect(g.finished).toHaveLength(1);
    expect(errnoOf(() => g.finished[0]!.check())).toBe(Errno.EPROTO);
  });

  it('rejects unknown cookies, bad magic, oversized status chunks and unknown non-error chunks', () => {
    const h = new Harness();
    expect(() => h.feed(encodeSimpleReply(0, 0, 9), [])).toThrow(/unknown cookie/);
    const bad = Buffer.alloc(20);
    bad.writeUInt32BE(0x12345678, 0);
    expect(() => new Harness().feed(bad, [])).toThrow(/bad reply magic/);

    const s = new Harness();
    s.add(NBD_CMD.BLOCK_STATUS, 1, 0, 4096);
    const huge = chunkHeader(NBD_REPLY_FLAG_DONE, 5, 1, 4 + 8 * (1 << 20) + 8);
    expect(() => s.feed(huge, [])).toThrow(/more than/);

    const u = new Harness();
    u.add(NBD_CMD.READ, 1, 0, 4096);
    expect(() => u.feed(chunkHeader(NBD_REPLY_FLAG_DONE, 77, 1, 0), [])).toThrow(/unknown non-error/);
  });

  it('fails only the request for an unknown error-type chunk, then goes on', () => {
    const h = new Harness();
    h.add(NBD_CMD.WRITE, 1, 0, 512);
    h.add(NBD_CMD.WRITE, 2, 0, 512);
    h.feed(Buffer.concat([chunkHeader(NBD_REPLY_FLAG_DONE, 0x8123, 1, 3), Buffer.from('abc'), encodeSimpleReply(0, 0, 2)]), [21, 22]);
    expect(h.finished.map((r) => r.cookieLo)).toEqual([1, 2]);
    expect(errnoOf(() => h.finished[0]!.check())).toBe(Errno.EINVAL);
    h.finished[1]!.check();
  });

  it('rejects chunk types that do not fit the command', () => {
    const h = new Harness();
    h.add(NBD_CMD.WRITE, 1, 0, 512);
    expect(() => h.feed(encodeChunkOffsetHole(0, 1, true, 0, 512), [])).toThrow(/only READ/);
    const b = new Harness();
    b.add(NBD_CMD.READ, 1, 0, 512);
    expect(() => b.feed(encodeChunkBlockStatus(0, 1, true, 0, [512, 0]), [])).toThrow(/only BLOCK_STATUS/);
    const z = new Harness();
    z.add(NBD_CMD.BLOCK_STATUS, 1, 0, 512);
    expect(() => z.feed(encodeChunkBlockStatus(0, 1, true, 0, [0, 0]), [])).toThrow(/length 0/);
  });
});

/** A structured reply chunk header with arbitrary fields (20 bytes). */
function chunkHeader(flags: number, type: number, cookie: number, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie, 12);
  b.writeUInt32BE(length, 16);
  return b;
}

describe('ChunkReader.consumeInto', () => {
  it('copies across chunk boundaries into place and consumes exactly what it copied', () => {
    const r = new ChunkReader();
    r.push(Buffer.from('abc'));
    r.push(Buffer.from('defg'));
    const target = Buffer.alloc(8, '.');
    expect(r.consumeInto(target, 1, 5)).toBe(5);
    expect(target.toString()).toBe('.abcde..');
    expect(r.consumeInto(target, 6, 10)).toBe(2);
    expect(target.toString()).toBe('.abcdefg');
    expect(r.length).toBe(0);
    expect(r.consumeInto(target, 0, 4)).toBe(0);
  });
});
