/**
 * BlockQueue's own invariants, driven through a gated backend so the test decides when each
 * backend call completes: the flush barrier, FUA emulation, backpressure, read coalescing,
 * emulation of missing capabilities, close. Each ordering test fails if the queue's barrier is
 * removed (see the closing note of issue 9 for the mutations applied).
 */
import { describe, expect, it } from 'vitest';
import type { BackendCaps } from '../../src/core/backend.js';
import { Errno, NbddError } from '../../src/core/errors.js';
import { BlockQueue } from '../../src/core/queue.js';
import { GatedBackend, turns } from '../helpers/gated-backend.js';
import { TestBackend } from '../helpers/test-backend.js';

const SIZE = 1 << 20;

function setup(caps: Partial<BackendCaps> = {}, queueOpts: { maxDepth?: number; maxBytes?: number } = {}) {
  const inner = new TestBackend(SIZE, caps);
  const gate = new GatedBackend(inner);
  const queue = new BlockQueue(gate, queueOpts);
  return { inner, gate, queue };
}

/** Tracks whether a promise has settled, without awaiting it. */
function watch<T>(p: Promise<T>): { done: () => boolean; promise: Promise<T> } {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  return { done: () => settled, promise: p };
}

describe('BlockQueue: FLUSH barrier', () => {
  it('issues the backend flush only after every earlier write has completed', async () => {
    const { gate, queue } = setup();
    const w1 = watch(queue.write(0, Buffer.from('aaaa')));
    const w2 = watch(queue.writeZeroes(4096, 4096));
    const f = watch(queue.flush());
    await turns();
    expect(gate.ops()).toEqual(['write', 'writeZeroes']);

    (await gate.waitFor('write')).release();
    await turns();
    expect(w1.done()).toBe(true);
    expect(gate.ops()).not.toContain('flush');

    (await gate.waitFor('writeZeroes')).release();
    const flushCall = await gate.waitFor('flush');
    expect(w2.done()).toBe(true);
    expect(f.done()).toBe(false);
    flushCall.release();
    await f.promise;
  });

  it('waits for earlier writes that fail, too, and still flushes', async () => {
    const { gate, queue } = setup();
    const w = queue.write(0, Buffer.from('aaaa')).catch((e: unknown) => e);
    const f = watch(queue.flush());
    (await gate.waitFor('write')).fail(new NbddError(Errno.EIO, 'injected'));
    expect(await w).toBeInstanceOf(NbddError);
    (await gate.waitFor('flush')).release();
    await f.promise;
  });

  it('a second flush waits for the writes before the first one too, not only for those since', async () => {
    const { gate, queue } = setup();
    const slow = watch(queue.write(0, Buffer.from('slow')));
    const f1 = watch(queue.flush());
    const fast = watch(queue.write(8192, Buffer.from('fast')));
    const f2 = watch(queue.flush());
    (await gate.waitFor('write', (c) => c.offset === 8192)).release();
    await fast.promise;
    await turns();
    expect(slow.done()).toBe(false);
    expect(gate.ops()).not.toContain('flush'); // neither flush may start while 'slow' is in flight
    (await gate.waitFor('write', (c) => c.offset === 0)).release();
    (await gate.waitFor('flush')).release();
    await f1.promise;
    gate.release();
    await f2.promise;
  });

  it('does not wait for writes received after the flush', async () => {
    const { gate, queue } = setup();
    const f = watch(queue.flush());
    const w = watch(queue.write(0, Buffer.from('later')));
    await turns();
    expect(gate.ops()).toEqual(['flush', 'write']);
    (await gate.waitFor('flush')).release();
    await f.promise;
    expect(w.done()).toBe(false);
    gate.release();
    await w.promise;
  });

  it('a flush whose writes completed while another flush ran gets a backend flush of its own', async () => {
    const { gate, queue } = setup();
    const f1 = watch(queue.flush());
    const first = await gate.waitFor('flush');
    // A write and a flush arrive while the first backend flush is running.
    const w = watch(queue.write(0, Buffer.from('x')));
    const f2 = watch(queue.flush());
    (await gate.waitFor('write')).release();
    await w.promise;
    await turns();
    expect(gate.issued.filter((c) => c.op === 'flush')).toHaveLength(1);
    first.release();
    await f1.promise;
    const second = await gate.waitFor('flush', (c) => c !== first);
    await turns();
    expect(f2.done()).toBe(false);
    second.release();
    await f2.promise;
  });
});

describe('BlockQueue: FUA', () => {
  it('on a backend without native FUA, acknowledges a FUA write only after a flush that follows it', async () => {
    const { gate, queue } = setup({ fua: false });
    const w = watch(queue.write(0, Buffer.from('abcd'), { fua: true }));
    const write = await gate.waitFor('write');
    expect(write.options?.fua).toBeFalsy();
    await turns();
    expect(gate.ops()).toEqual(['write']);
    write.release();
    const flush = await gate.waitFor('flush');
    await turns();
    expect(w.done()).toBe(false);
    flush.release();
    await w.promise;
    expect(gate.ops()).toEqual(['write', 'flush']);
  });

  it('emulates FUA on write-zeroes and trim the same way', async () => {
    const { gate, queue } = setup({ fua: false });
    const z = watch(queue.writeZeroes(0, 4096, { fua: true }));
    (await gate.waitFor('writeZeroes')).release();
    const flush = await gate.waitFor('flush');
    await turns();
    expect(z.done()).toBe(false);
    flush.release();
    await z.promise;
    const t = watch(queue.trim(0, 4096, { fua: true }));
    (await gate.waitFor('trim')).release();
    const flush2 = await gate.waitFor('flush', (c) => c !== flush);
    await turns();
    expect(t.done()).toBe(false);
    flush2.release();
    await t.promise;
  });

  it('passes FUA to a backend that has it, with no flush', async () => {
    const { gate, queue } = setup({ fua: true });
    gate.open();
    await queue.write(0, Buffer.from('abcd'), { fua: true });
    expect(gate.ops()).toEqual(['write']);
    expect(gate.issued[0]!.options?.fua).toBe(true);
  });
});

describe('BlockQueue: backpressure', () => {
  it('is saturated at maxDepth requests in flight and drains as they complete', async () => {
    const { gate, queue } = setup({}, { maxDepth: 4 });
    let drains = 0;
    queue.onDrain(() => drains++);
    const writes = Array.from({ length: 4 }, (_, i) => queue.write(i * 4096, Buffer.alloc(4096, i)));
    expect(queue.saturated).toBe(true);
    expect(queue.depth).toBe(4);
    await turns();
    expect(queue.saturated).toBe(true);
    gate.held[0]!.release();
    await writes[0];
    expect(queue.saturated).toBe(false);
    expect(drains).toBe(1);
    gate.release();
    await Promise.all(writes);
    expect(queue.depth).toBe(0);
    expect(drains).toBe(1);
  });

  it('is saturated at maxBytes of payload and drains as it completes', async () => {
    const { gate, queue } = setup({}, { maxBytes: 64 * 1024 });
    const a = queue.write(0, Buffer.alloc(32 * 1024));
    expect(queue.saturated).toBe(false);
    const b = queue.read(65536, 32 * 1024);
    expect(queue.saturated).toBe(true);
    const w = await gate.waitFor('write');
    w.release();
    await a;
    expect(queue.saturated).toBe(false);
    gate.release();
    await b;
  });
});

describe('BlockQueue: read coalescing', () => {
  it('merges contiguous reads of one batch into one backend read and answers each with its slice', async () => {
    const { inner, gate, queue } = setup();
    for (let i = 0; i < inner.data.length; i++) inner.data[i] = (i * 13) & 0xff;
    gate.open();
    const [a, b, c] = await Promise.all([queue.read(4096, 4096), queue.read(8192, 100), queue.read(8292, 3900)]);
    expect(gate.issued.map((x) => [x.op, x.offset, x.length])).toEqual([['read', 4096, 8096]]);
    expect(a.equals(inner.data.subarray(4096, 8192))).toBe(true);
    expect(b.equals(inner.data.subarray(8192, 8292))).toBe(true);
    expect(c.equals(inner.data.subarray(8292, 12192))).toBe(true);
  });

  it('does not merge reads that are not contiguous, nor past the largest transfer', async () => {
    const { gate, queue } = setup({ maxTransfer: 8192 });
    gate.open();
    await Promise.all([queue.read(0, 4096), queue.read(8192, 4096)]);
    expect(gate.issued.map((x) => x.length)).toEqual([4096, 4096]);
    gate.issued.length = 0;
    await Promise.all([queue.read(0, 4096), queue.read(4096, 4096), queue.read(8192, 4096)]);
    expect(gate.issued.map((x) => [x.offset, x.length])).toEqual([
      [0, 8192],
      [8192, 4096],
    ]);
  });

  it('merges no further than 128 KiB, where reads get pooled buffers of their own', async () => {
    const { gate, queue } = setup();
    gate.open();
    const k = 1024;
    await Promise.all([queue.read(0, 64 * k), queue.read(64 * k, 64 * k), queue.read(128 * k, 4 * k), queue.read(132 * k, 128 * k), queue.read(260 * k, 256 * k)]);
    expect(gate.issued.map((x) => [x.offset! / k, x.length! / k])).toEqual([
      [0, 128],
      [128, 4],
      [132, 128],
      [260, 256],
    ]);
  });

  it('when a merged read fails, tries each of its reads alone: a bad sector fails only its own request', async () => {
    const { inner, gate, queue } = setup();
    inner.data.fill(7, 0, 512);
    const a = queue.read(0, 512).catch((e: unknown) => e);
    const b = queue.read(512, 512).catch((e: unknown) => e);
    (await gate.waitFor('read', (c) => c.length === 1024)).fail(new NbddError(Errno.EIO, 'bad sector at 512'));
    (await gate.waitFor('read', (c) => c.offset === 0 && c.length === 512)).release();
    (await gate.waitFor('read', (c) => c.offset === 512 && c.length === 512)).fail(new NbddError(Errno.EIO, 'bad sector at 512'));
    expect(((await a) as Buffer).equals(Buffer.alloc(512, 7))).toBe(true);
    expect(((await b) as NbddError).errno).toBe(Errno.EIO);
    expect(queue.depth).toBe(0);
  });
});

describe('BlockQueue: emulation of what the backend lacks', () => {
  it('writes zeroes where the backend cannot, and refuses fast zero with ENOTSUP', async () => {
    const { inner, gate, queue } = setup({ writeZeroes: false });
    inner.data.fill(0xff);
    gate.open();
    await queue.writeZeroes(4096, 8192);
    expect(gate.ops().every((op) => op === 'write')).toBe(true);
    expect(inner.data.subarray(4096, 12288).every((x) => x === 0)).toBe(true);
    expect(inner.data[4095]).toBe(0xff);
    await expect(queue.writeZeroes(0, 4096, { fastZero: true })).rejects.toMatchObject({ errno: Errno.ENOTSUP });
  });

  it('drops trim where the backend has none, and reports all data for block status', async () => {
    const { gate, queue } = setup({ trim: false });
    gate.open();
    await queue.trim(0, 4096);
    expect(gate.ops()).toEqual([]);
  });
});

describe('BlockQueue: close', () => {
  it('waits for requests in flight, closes the backend, then refuses new requests with ESHUTDOWN', async () => {
    const { inner, gate, queue } = setup();
    const w = watch(queue.write(0, Buffer.from('z')));
    const closing = watch(queue.close());
    await turns();
    expect(closing.done()).toBe(false);
    expect(inner.closed).toBe(false);
    gate.release();
    await w.promise;
    await closing.promise;
    expect(inner.closed).toBe(true);
    await expect(queue.read(0, 1)).rejects.toMatchObject({ errno: Errno.ESHUTDOWN });
  });
});
