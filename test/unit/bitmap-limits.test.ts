/**
 * What a control client may ask of a device's bitmaps: names that UTF-8 can store (lone
 * surrogates would collide once stored), a count cap, and a memory cap checked before anything is
 * allocated — each refused with its own errno and message, the set unchanged.
 */
import { describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { Errno, NbddError } from '../../src/core/errors.js';

const GiB = 1024 ** 3;

async function rejects(p: Promise<unknown>, errno: number, message: RegExp): Promise<void> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(NbddError);
  expect((err as NbddError).errno).toBe(errno);
  expect((err as NbddError).message).toMatch(message);
}

describe('bitmap names', () => {
  it('refuses lone surrogates, which would be stored as the same bytes', async () => {
    const set = await BitmapSet.open(GiB, null);
    expect(Buffer.from('s\ud800').equals(Buffer.from('s\udc00'))).toBe(true); // why
    await rejects(set.add('s\ud800'), Errno.EINVAL, /lone surrogate/);
    await rejects(set.add('s\udc00'), Errno.EINVAL, /lone surrogate/);
    await rejects(set.add('\udc00\ud800'), Errno.EINVAL, /lone surrogate/);
    await set.add('s\ud83d\ude00'); // a pair is fine
    expect(set.list().map((b) => b.name)).toEqual(['s\ud83d\ude00']);
  });

  it('takes 1023 UTF-8 bytes and refuses 1024', async () => {
    const set = await BitmapSet.open(GiB, null);
    await set.add('é'.repeat(511) + 'x');
    await rejects(set.add('é'.repeat(512)), Errno.EINVAL, /at most 1023 bytes/);
  });
});

describe('bitmap limits', () => {
  it('caps the count, and a removed bitmap frees its place', async () => {
    const set = await BitmapSet.open(GiB, null, { maxBitmaps: 3 });
    for (const n of ['a', 'b', 'c']) await set.add(n);
    await rejects(set.add('d'), Errno.ENOSPC, /has 3 bitmaps, the most it keeps \(--max-bitmaps 3\)/);
    await rejects(set.checkpoint('d'), Errno.ENOSPC, /the most it keeps/);
    expect(set.list().map((b) => b.name)).toEqual(['a', 'b', 'c']);
    await set.remove('b');
    await set.add('d');
  });

  it('refuses, before allocating, a bitmap larger than one may be (64 TiB at 4 KiB and at 512 B)', async () => {
    const set = await BitmapSet.open(64 * 1024 * GiB, null);
    const before = process.memoryUsage().arrayBuffers;
    await rejects(set.add('g4k', { granularity: 4096 }), Errno.ENOMEM, /needs 2 GiB, more than the 512 MiB one bitmap may have; use a larger granularity/);
    await rejects(set.add('g512', { granularity: 512 }), Errno.ENOMEM, /needs 16 GiB/);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 << 20);
    expect(set.list()).toEqual([]);
  });

  it('caps the memory of all bitmaps together', async () => {
    const set = await BitmapSet.open(GiB, null, { maxMemoryBytes: 300 * 1024 });
    await set.add('a', { granularity: 512 }); // 2 Mi granules: 256 KiB
    await rejects(set.add('b', { granularity: 512 }), Errno.ENOMEM, /the device's bitmaps have 256 KiB of 300 KiB/);
    await set.add('c', { granularity: 65536 }); // 2 KiB fits
  });
});
