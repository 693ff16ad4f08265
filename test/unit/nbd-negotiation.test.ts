/**
 * The server's negotiation and request decisions without a socket: the state machine fed a client
 * script cut at every byte (and byte by byte) must send the same frames and end the same way; a
 * fuzzed stream must never throw out of it; validation and sparse-read planning as tables.
 */
import { describe, expect, it } from 'vitest';
import type { Extent } from '../../src/core/backend.js';
import { BlockQueue } from '../../src/core/queue.js';
import { NbdExport } from '../../src/nbd/server/export.js';
import { Negotiation, type NegotiationEnd } from '../../src/nbd/server/negotiation.js';
import { planSparseRead, readsSparsely, validateRequest, type RequestContext } from '../../src/nbd/server/requests.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_ERR, NBD_OPT } from '../../src/nbd/wire/constants.js';
import { encodeOption } from '../../src/nbd/wire/handshake.js';
import { ChunkReader } from '../../src/nbd/wire/reader.js';
import { decodeRequest } from '../../src/nbd/wire/transmission.js';
import { prng } from '../helpers/prng.js';
import { clientFlags, optGo, optListMeta, optSetMeta, optStructured, request } from '../helpers/nbd-script.js';
import { TestBackend } from '../helpers/test-backend.js';

const SIZE = 1 << 20;
const disk = new NbdExport({ name: 'disk', description: 'test disk', queue: new BlockQueue(new TestBackend(SIZE)) });
const other = new NbdExport({ name: 'other', queue: new BlockQueue(new TestBackend(SIZE)) });
const directory = { findExport: (n: string) => [disk, other].find((e) => e.name === n), listExports: () => [disk, other] };

interface Outcome {
  frames: string;
  end: NegotiationEnd | null;
  /** Bytes left in the reader after the end (the first requests). */
  rest: string;
}

/** Feeds `script` in pieces cut at `cuts`, advancing after each; what was sent and how it ended. */
function run(script: Buffer, cuts: number[]): Outcome {
  const sent: Buffer[] = [];
  const n = new Negotiation(directory, (f) => sent.push(f));
  const reader = new ChunkReader();
  let end: NegotiationEnd | null = null;
  let at = 0;
  for (const cut of [...cuts, script.length]) {
    reader.push(script.subarray(at, cut));
    at = cut;
    end ??= n.advance(reader);
  }
  return { frames: Buffer.concat(sent).toString('hex'), end, rest: reader.length ? reader.consume(reader.length).toString('hex') : '' };
}

const firstRequest = request(NBD_CMD.READ, 9, 4096, 512);
const scripts: Record<string, Buffer> = {
  'structured, meta contexts, list, GO, then a request': Buffer.concat([
    clientFlags(),
    optStructured(),
    optListMeta([], 'disk'),
    optSetMeta(['base:allocation', 'qemu:allocation-depth', 'nope:x'], 'disk'),
    encodeOption(NBD_OPT.LIST),
    encodeOption(0x4242, Buffer.from('unknown option')),
    optGo('disk', [1, 2, 3]),
    firstRequest,
  ]),
  'bad options answered, then EXPORT_NAME': Buffer.concat([
    clientFlags(),
    encodeOption(NBD_OPT.STRUCTURED_REPLY, Buffer.from('x')),
    optSetMeta(['base:allocation'], 'disk'), // refused: no structured replies yet
    optGo('missing'),
    encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('other')),
    firstRequest,
  ]),
  'ABORT': Buffer.concat([clientFlags(), optStructured(), encodeOption(NBD_OPT.ABORT)]),
};

describe('Negotiation, cut at every byte', () => {
  for (const [name, script] of Object.entries(scripts)) {
    it(name, () => {
      const whole = run(script, []);
      expect(whole.end).not.toBeNull();
      for (let cut = 1; cut < script.length; cut++) expect(run(script, [cut]), `cut at ${cut}`).toEqual(whole);
      expect(run(script, Array.from({ length: script.length - 1 }, (_, i) => i + 1)), 'byte by byte').toEqual(whole);
    });
  }

  it('ends in transmission with the contexts chosen for that export, and leaves the request bytes', () => {
    const { end, rest } = run(scripts['structured, meta contexts, list, GO, then a request']!, []);
    expect(end).toMatchObject({ kind: 'transmission', structured: true });
    if (end?.kind !== 'transmission') throw new Error('unreachable');
    expect(end.export).toBe(disk);
    expect(end.contexts.map((c) => c.name)).toEqual(['base:allocation', 'qemu:allocation-depth']);
    expect(rest).toBe(firstRequest.toString('hex'));
    expect(decodeRequest(Buffer.from(rest, 'hex'))).toMatchObject({ type: NBD_CMD.READ, offset: 4096, length: 512 });
  });

  it('drops contexts chosen for another export, and closes on ABORT, unknown EXPORT_NAME or bad flags', () => {
    const switched = run(Buffer.concat([clientFlags(), optStructured(), optSetMeta(['base:allocation'], 'disk'), optGo('other')]), []);
    expect(switched.end).toMatchObject({ kind: 'transmission', contexts: [] });
    expect(run(scripts.ABORT!, []).end).toMatchObject({ kind: 'close', graceful: true });
    expect(run(Buffer.concat([clientFlags(), encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('missing'))]), []).end).toMatchObject({ kind: 'close', graceful: true });
    expect(run(clientFlags(0x80), []).end).toMatchObject({ kind: 'close', graceful: false, reason: expect.stringMatching(/client flags/) });
  });

  it('skips an oversized option without buffering it, and stops after too many options', () => {
    const big = encodeOption(0x99, Buffer.alloc(100_000));
    const o = run(Buffer.concat([clientFlags(), big, optGo('disk')]), [4 + 16 + 10, 4 + 16 + 70_000]);
    expect(o.end).toMatchObject({ kind: 'transmission' });
    const many = Buffer.concat([clientFlags(), ...Array.from({ length: 300 }, () => encodeOption(NBD_OPT.LIST))]);
    expect(run(many, []).end).toMatchObject({ kind: 'close', graceful: false, reason: expect.stringMatching(/options/) });
  });

  it('never throws on fuzzed input (random bytes after valid flags, and mutated scripts)', () => {
    const rand = prng(7);
    const base = scripts['structured, meta contexts, list, GO, then a request']!;
    for (let i = 0; i < 300; i++) {
      const s = Buffer.from(base);
      for (let k = 0; k < 1 + (i % 5); k++) s[Math.floor(rand() * s.length)] = Math.floor(rand() * 256);
      expect(() => run(s, [Math.floor(rand() * s.length)])).not.toThrow();
      const noise = Buffer.concat([clientFlags(), Buffer.from(Array.from({ length: 200 }, () => Math.floor(rand() * 256)))]);
      expect(() => run(noise, [])).not.toThrow();
    }
  });
});

describe('validateRequest', () => {
  const ctx: RequestContext = { size: SIZE, readOnly: false, minBlockSize: 1, maxPayload: 1 << 20, structured: true, contexts: 1 };
  const h = (type: number, offset: number, length: number, flags = 0) => ({ type, flags, cookieHi: 0, cookieLo: 1, offset, length });
  it('answers each refusal with the spec error', () => {
    expect(validateRequest(h(NBD_CMD.READ, 0, 4096), ctx)).toBe(0);
    expect(validateRequest(h(99, 0, 1), ctx)).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.WRITE, 0, 1, NBD_CMD_FLAG.DF), ctx)).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.READ, 0, 1, NBD_CMD_FLAG.DF), { ...ctx, structured: false })).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.TRIM, 0, 1), { ...ctx, readOnly: true })).toBe(NBD_ERR.EPERM);
    expect(validateRequest(h(NBD_CMD.WRITE, SIZE - 1, 2), ctx)).toBe(NBD_ERR.ENOSPC);
    expect(validateRequest(h(NBD_CMD.READ, SIZE - 1, 2), ctx)).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.READ, 1, 512), { ...ctx, minBlockSize: 512 })).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.READ, 0, 2 << 20, NBD_CMD_FLAG.DF), { ...ctx, size: 4 << 20 })).toBe(NBD_ERR.EOVERFLOW);
    expect(validateRequest(h(NBD_CMD.READ, 0, 2 << 20), { ...ctx, size: 4 << 20 })).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.BLOCK_STATUS, 0, 4096), { ...ctx, contexts: 0 })).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.BLOCK_STATUS, 0, 0), ctx)).toBe(NBD_ERR.EINVAL);
    expect(validateRequest(h(NBD_CMD.FLUSH, SIZE * 2, 0), ctx)).toBe(0);
    expect(validateRequest(h(NBD_CMD.WRITE_ZEROES, 0, 4096, NBD_CMD_FLAG.FAST_ZERO | NBD_CMD_FLAG.NO_HOLE), ctx)).toBe(0);
  });
});

describe('sparse reads', () => {
  const ext = (length: number, zero: boolean, hole = zero): Extent => ({ length, zero, hole });
  it('are chosen only when structured, without DF, long enough, and the backend can tell', () => {
    const r = (length: number, flags = 0) => ({ type: NBD_CMD.READ, flags, cookieHi: 0, cookieLo: 1, offset: 0, length });
    expect(readsSparsely(r(65536), true, { blockStatus: true })).toBe(true);
    expect(readsSparsely(r(65535), true, { blockStatus: true })).toBe(false);
    expect(readsSparsely(r(65536, NBD_CMD_FLAG.DF), true, { blockStatus: true })).toBe(false);
    expect(readsSparsely(r(65536), false, { blockStatus: true })).toBe(false);
    expect(readsSparsely(r(65536), true, { blockStatus: false })).toBe(false);
  });
  it('plan one part per extent within the range, zero extents as holes', () => {
    expect(planSparseRead([ext(8192, false), ext(4096, true), ext(1 << 20, false)], 4096, 16384)).toEqual([
      { offset: 4096, length: 8192, hole: false },
      { offset: 12288, length: 4096, hole: true },
      { offset: 16384, length: 4096, hole: false },
    ]);
    expect(planSparseRead([ext(1 << 20, true)], 0, 65536)).toEqual([{ offset: 0, length: 65536, hole: true }]);
  });
});

describe('Negotiation: STARTTLS', () => {
  /** Option replies as [option, reply type] pairs, from the frames sent. */
  function replies(frames: Buffer[]): [number, number][] {
    const out: [number, number][] = [];
    for (const f of frames) if (f.length >= 20 && f.readUInt32BE(0) === 0x0003e889) out.push([f.readUInt32BE(8), f.readUInt32BE(12)]);
    return out;
  }
  function negotiate(tls: 'off' | 'on' | 'require', script: Buffer): { sent: Buffer[]; n: Negotiation; reader: ChunkReader; end: NegotiationEnd | null } {
    const sent: Buffer[] = [];
    const n = new Negotiation(directory, (f) => sent.push(f), 'test', tls);
    const reader = new ChunkReader();
    reader.push(script);
    return { sent, n, reader, end: n.advance(reader) };
  }
  const ACK = 1;
  const ERR_UNSUP = 0x80000001;
  const ERR_INVALID = 0x80000003;
  const ERR_TLS_REQD = 0x80000005;

  it('require: every option but STARTTLS and ABORT gets ERR_TLS_REQD; STARTTLS ends in starttls; afterwards all works, and STARTTLS again is invalid', () => {
    const r = negotiate('require', Buffer.concat([clientFlags(), optStructured(), encodeOption(NBD_OPT.LIST), optGo('disk', []), encodeOption(NBD_OPT.STARTTLS)]));
    expect(replies(r.sent)).toEqual([
      [NBD_OPT.STRUCTURED_REPLY, ERR_TLS_REQD],
      [NBD_OPT.LIST, ERR_TLS_REQD],
      [NBD_OPT.GO, ERR_TLS_REQD],
      [NBD_OPT.STARTTLS, ACK],
    ]);
    expect(r.end).toEqual({ kind: 'starttls' });
    r.n.tlsStarted();
    r.sent.length = 0;
    r.reader.push(Buffer.concat([encodeOption(NBD_OPT.STARTTLS), optStructured(), optGo('disk', [])]));
    const end = r.n.advance(r.reader);
    expect(replies(r.sent).map(([o, t]) => [o, t])).toEqual([
      [NBD_OPT.STARTTLS, ERR_INVALID],
      [NBD_OPT.STRUCTURED_REPLY, ACK],
      [NBD_OPT.GO, 3], // NBD_REP_INFO
      [NBD_OPT.GO, 3],
      [NBD_OPT.GO, ACK],
    ]);
    expect(end).toMatchObject({ kind: 'transmission', structured: true });
  });

  it('require: EXPORT_NAME before TLS closes the connection (it has no error reply)', () => {
    const r = negotiate('require', Buffer.concat([clientFlags(), encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from('disk'))]));
    expect(r.end).toMatchObject({ kind: 'close', graceful: false });
  });

  it('off: STARTTLS is unsupported; on: plaintext options work and STARTTLS is accepted', () => {
    expect(replies(negotiate('off', Buffer.concat([clientFlags(), encodeOption(NBD_OPT.STARTTLS)])).sent)).toEqual([[NBD_OPT.STARTTLS, ERR_UNSUP]]);
    const on = negotiate('on', Buffer.concat([clientFlags(), optStructured(), encodeOption(NBD_OPT.STARTTLS)]));
    expect(replies(on.sent)).toEqual([
      [NBD_OPT.STRUCTURED_REPLY, ACK],
      [NBD_OPT.STARTTLS, ACK],
    ]);
    expect(on.end).toEqual({ kind: 'starttls' });
  });
});
