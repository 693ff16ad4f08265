import { describe, expect, it } from 'vitest';
import { ChunkReader } from '../../src/nbd/wire/reader.js';

const bytes = (n: number, start = 0): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (start + i) & 0xff));

describe('ChunkReader', () => {
  it('returns a view when the bytes lie in one chunk', () => {
    const r = new ChunkReader();
    const chunk = bytes(10);
    r.push(chunk);
    const v = r.consume(4);
    expect([...v]).toEqual([0, 1, 2, 3]);
    expect(v.buffer).toBe(chunk.buffer);
    expect(r.length).toBe(6);
  });

  it('yields the same bytes for every way of splitting the input', () => {
    const input = bytes(40);
    for (let cut1 = 0; cut1 <= input.length; cut1++) {
      for (let cut2 = cut1; cut2 <= input.length; cut2 += 3) {
        const r = new ChunkReader();
        r.push(input.subarray(0, cut1));
        r.push(input.subarray(cut1, cut2));
        r.push(input.subarray(cut2));
        const out = Buffer.concat([r.consume(7), r.consume(13), r.consume(0), r.consume(20)]);
        expect(out.equals(input)).toBe(true);
        expect(r.length).toBe(0);
      }
    }
  });

  it('counts the views it lends, but not copies, skips or on-the-spot decodes', () => {
    const r = new ChunkReader();
    r.push(bytes(10));
    r.push(bytes(10, 10));
    expect(r.decode(4, (b) => b.readUInt32BE(0))).toBe(0x00010203);
    r.consumeInto(Buffer.alloc(2), 0, 2);
    r.skip(1);
    expect(r.consume(5).length).toBe(5); // straddles the chunks: a copy
    expect(r.lent).toBe(0);
    r.consume(3); // a view of the second chunk
    expect(r.lent).toBe(1);
    expect(r.decode(3, (b) => [...b])).toEqual([15, 16, 17]);
    expect(r.lent).toBe(1);
  });

  it('skips across chunks without copying and reports what it dropped', () => {
    const r = new ChunkReader();
    r.push(bytes(5));
    r.push(bytes(5, 5));
    expect(r.skip(7)).toBe(7);
    expect([...r.consume(3)]).toEqual([7, 8, 9]);
    expect(r.skip(10)).toBe(0);
  });

  it('consumes zero bytes from an empty reader (zero-length option data)', () => {
    const r = new ChunkReader();
    expect(r.consume(0).length).toBe(0);
    r.push(bytes(2));
    expect(r.consume(0).length).toBe(0);
    expect(r.length).toBe(2);
  });

  it('refuses to consume more than is buffered', () => {
    const r = new ChunkReader();
    r.push(bytes(3));
    expect(() => r.consume(4)).toThrow(RangeError);
  });

  it('stays correct over many small chunks (compaction)', () => {
    const r = new ChunkReader();
    const input = bytes(1000);
    for (let i = 0; i < input.length; i++) r.push(input.subarray(i, i + 1));
    const parts: Buffer[] = [];
    while (r.length > 0) parts.push(r.consume(Math.min(r.length, 37)));
    expect(Buffer.concat(parts).equals(input)).toBe(true);
  });
});
