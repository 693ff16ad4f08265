import { describe, expect, it } from 'vitest';
import { MEMORY_CHUNK_SIZE, MemoryBackend } from '../../src/backends/memory.js';
import { Errno, NbddError } from '../../src/core/errors.js';
import { expectMatchesModel, runModel } from '../helpers/backend-model.js';

const C = MEMORY_CHUNK_SIZE;
const hole = (length: number) => ({ length, hole: true, zero: true, depth: 0 });
const data = (length: number, zero = false) => ({ length, hole: false, zero, depth: 1 });

describe('MemoryBackend', () => {
  it('starts as one hole that reads as zeroes and holds no memory', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    expect(b.size).toBe(4 * C);
    expect((await b.read(100, 3 * C)).equals(Buffer.alloc(3 * C))).toBe(true);
    expect(await b.blockStatus(0, 4 * C)).toEqual([hole(4 * C)]);
    expect(b.allocatedBytes).toBe(0);
  });

  it('refuses a range outside the disk as an internal error that names it (assertRange)', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    for (const [offset, length] of [[4 * C - 100, 200], [-1, 10], [0, 0], [0.5, 10]]) {
      const err = await b.read(offset, length).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(NbddError);
      expect((err as NbddError).errno).toBe(Errno.EIO);
      expect((err as NbddError).message).toContain(`range ${offset}+${length} outside 0..${4 * C}`);
    }
  });

  it('allocates the chunks a write touches and reports them exactly', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    await b.write(C - 10, Buffer.alloc(20, 0xab)); // straddles chunks 0 and 1
    expect(b.allocatedBytes).toBe(2 * C);
    const back = await b.read(C - 12, 24);
    expect([...back]).toEqual([0, 0, ...new Array(20).fill(0xab), 0, 0]);
    expect(await b.blockStatus(0, 4 * C)).toEqual([data(2 * C), hole(2 * C)]);
    // Within an allocated chunk, "zero" is exact for the queried bytes.
    expect(await b.blockStatus(0, C - 10)).toEqual([data(C - 10, true)]);
    expect(await b.blockStatus(0, C - 9)).toEqual([data(C - 9)]);
    // Extents start at the queried offset and end at its end.
    expect(await b.blockStatus(C + 5, 2 * C)).toEqual([data(C - 5), hole(C + 5)]);
  });

  it('trim frees the chunks it covers and zeroes partial ones', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    await b.write(0, Buffer.alloc(4 * C, 7));
    await b.trim(C / 2, 2 * C); // half of chunk 0, all of chunk 1, half of chunk 2
    expect(b.allocatedBytes).toBe(3 * C);
    const back = await b.read(0, 4 * C);
    expect(back.subarray(0, C / 2).every((x) => x === 7)).toBe(true);
    expect(back.subarray(C / 2, C / 2 + 2 * C).equals(Buffer.alloc(2 * C))).toBe(true);
    expect(back.subarray(C / 2 + 2 * C).every((x) => x === 7)).toBe(true);
    expect(await b.blockStatus(0, 4 * C)).toEqual([data(C), hole(C), data(2 * C)]);
    expect(await b.blockStatus(C / 2, C / 2)).toEqual([data(C / 2, true)]);
  });

  it('write-zeroes frees chunks without NO_HOLE and keeps them allocated with it', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    await b.write(0, Buffer.alloc(2 * C, 9));
    await b.writeZeroes(0, C);
    expect(await b.blockStatus(0, 4 * C)).toEqual([hole(C), data(C), hole(2 * C)]);
    await b.writeZeroes(C, 2 * C, { noHole: true, fastZero: true });
    expect(b.allocatedBytes).toBe(2 * C);
    expect(await b.blockStatus(0, 4 * C)).toEqual([hole(C), data(2 * C, true), hole(C)]);
    expect((await b.read(0, 4 * C)).equals(Buffer.alloc(4 * C))).toBe(true);
  });

  it('handles a size that is not a multiple of the chunk size', async () => {
    const size = 2 * C + 1000;
    const b = new MemoryBackend({ size });
    await b.write(size - 10, Buffer.alloc(10, 1));
    expect(b.allocatedBytes).toBe(1000);
    expect(await b.blockStatus(0, size)).toEqual([hole(2 * C), data(1000)]);
    await b.trim(2 * C, 1000);
    expect(b.allocatedBytes).toBe(0);
  });

  it('matches a byte model under random operations', async () => {
    for (const seed of [1, 2, 3]) {
      const b = new MemoryBackend({ size: 16 * C + 4096 });
      const model = await runModel(b, { seed, operations: 200, granule: 4096, maxGranules: 40 });
      await expectMatchesModel(b, model);
    }
  });

  it('asserts the range contract and read-only', async () => {
    const b = new MemoryBackend({ size: 4 * C });
    const internal = { name: 'NbddError', errno: Errno.EIO };
    await expect(b.read(4 * C - 1, 2)).rejects.toMatchObject(internal);
    await expect(b.read(0, 0)).rejects.toMatchObject(internal);
    await expect(b.read(-1, 1)).rejects.toMatchObject(internal);
    await expect(b.write(4 * C, Buffer.alloc(1))).rejects.toMatchObject(internal);
    await expect(b.blockStatus(1.5, 1)).rejects.toMatchObject(internal);
    const ro = new MemoryBackend({ size: C, readOnly: true });
    expect(ro.caps.readOnly).toBe(true);
    await expect(ro.write(0, Buffer.alloc(1))).rejects.toThrow(/read-only/);
    await expect(ro.trim(0, 1)).rejects.toThrow(/read-only/);
  });

  it('rejects a size that is not a positive safe integer', () => {
    for (const size of [0, -1, 1.5, 2 ** 53]) {
      expect(() => new MemoryBackend({ size })).toThrow(NbddError);
    }
  });

  it('advertises flush, FUA, trim and fast zeroes', async () => {
    const b = new MemoryBackend({ size: C });
    expect(b.caps).toMatchObject({ flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, multiConn: true });
    await b.write(0, Buffer.alloc(1, 1));
    await b.flush();
    await b.close();
    await b.close();
    expect(b.allocatedBytes).toBe(0);
  });
});
