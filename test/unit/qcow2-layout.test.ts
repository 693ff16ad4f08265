/** qcow2 on-disk codecs: header, extensions, entries, refcount packing, new-image layout. */
import { describe, expect, it } from 'vitest';
import { layoutNewImage } from '../../src/backends/qcow2/create.js';
import {
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_END,
  EXT_FEATURE_NAMES,
  FEATURE_TYPE,
  V3_HEADER_LENGTH,
  checkFeatures,
  decodeBitmapDirectory,
  decodeCompressed,
  decodeExtensions,
  decodeHeader,
  encodeExtension,
  encodeHeader,
  entryOffset,
  featureNames,
  geometryOf,
  getRefcount,
  maxRefcount,
  setRefcount,
  writeEntry,
  type Qcow2Header,
} from '../../src/backends/qcow2/format/index.js';

function header(overrides: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: 16,
    size: 1 << 30,
    cryptMethod: 0,
    l1Size: 2,
    l1TableOffset: 3 << 16,
    refcountTableOffset: 1 << 16,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V3_HEADER_LENGTH,
    compressionType: 0,
    ...overrides,
  };
}

describe('header', () => {
  it('round-trips through encode and decode', () => {
    const h = header({ backingFileOffset: 200, backingFileSize: 9, compatibleFeatures: 1n, autoclearFeatures: 1n });
    expect(decodeHeader(encodeHeader(h))).toEqual(h);
  });

  it('refuses every truncation with the length it needed', () => {
    const buf = encodeHeader(header());
    for (let n = 0; n < V3_HEADER_LENGTH; n++) {
      expect(() => decodeHeader(buf.subarray(0, n))).toThrow(n < 72 ? /truncated header/ : n < 104 ? /truncated v3 header/ : /truncated header \(\d+ bytes, header_length 112\)/);
    }
  });

  it('checks fields against the limits', () => {
    const cases: [Partial<Qcow2Header>, RegExp][] = [
      [{ clusterBits: 8 }, /cluster_bits 8/],
      [{ clusterBits: 22 }, /cluster_bits 22/],
      [{ refcountOrder: 7 }, /refcount_order 7/],
      [{ l1Size: 1 }, /l1_size 1 too small/],
      [{ l1TableOffset: 100 }, /l1_table_offset 0x64 is not aligned/],
      [{ refcountTableClusters: 0 }, /no refcount table/],
      [{ refcountTableClusters: 200 }, /exceeds 8388608 bytes/],
      [{ l1Size: 5_000_000 }, /exceeds 33554432 bytes/],
      [{ incompatibleFeatures: 1n << 4n, clusterBits: 13, l1Size: 1 << 16 }, /extended L2 entries need cluster_bits >= 14/],
      [{ compressionType: 1 }, /disagrees with the compression-type feature bit/],
      [{ incompatibleFeatures: 1n << 3n, compressionType: 2 }, /compression_type 2/],
      [{ backingFileOffset: 65530, backingFileSize: 10 }, /outside the first cluster/],
      [{ backingFileOffset: 200, backingFileSize: 2000 }, /backing file name length 2000 \(at most 1023\)/],
    ];
    for (const [o, re] of cases) expect(() => decodeHeader(encodeHeader(header(o))), re.source).toThrow(re);
    // A backing offset with size 0 names no backing file (QEMU opens such images).
    expect(decodeHeader(encodeHeader(header({ backingFileOffset: 65530, backingFileSize: 0 })))).toMatchObject({ backingFileSize: 0 });
  });

  it('reads v2 headers with the v2 defaults', () => {
    const buf = encodeHeader(header()).subarray(0, 72);
    buf.writeUInt32BE(2, 4);
    const h = decodeHeader(buf);
    expect(h).toMatchObject({ version: 2, refcountOrder: 4, headerLength: 72, incompatibleFeatures: 0n });
  });
});

describe('header extensions', () => {
  function cluster0(exts: Buffer[], h = header()): Buffer {
    const buf = Buffer.alloc(65536);
    Buffer.concat([encodeHeader(h), ...exts]).copy(buf);
    return buf;
  }

  it('decodes the backing format, feature names and bitmaps extension', () => {
    const names = Buffer.alloc(96);
    names[0] = 0;
    names[1] = 0;
    names.write('dirty bit', 2);
    names[48] = 2;
    names[49] = 5;
    names.write('x'.repeat(46), 50); // full length, no NUL
    const bitmaps = Buffer.alloc(24);
    bitmaps.writeUInt32BE(2, 0);
    bitmaps.writeBigUInt64BE(64n, 8);
    bitmaps.writeBigUInt64BE(0x50000n, 16);
    const ext = decodeExtensions(
      cluster0([encodeExtension(EXT_BACKING_FORMAT, Buffer.from('raw')), encodeExtension(EXT_FEATURE_NAMES, names), encodeExtension(EXT_BITMAPS, bitmaps), encodeExtension(0x12345678, Buffer.alloc(3)), encodeExtension(EXT_END, Buffer.alloc(0))]),
      header(),
    );
    expect(ext.backingFormat).toBe('raw');
    expect(ext.featureNames).toEqual([
      { type: 0, bit: 0, name: 'dirty bit' },
      { type: 2, bit: 5, name: 'x'.repeat(46) },
    ]);
    expect(ext.bitmaps).toEqual({ nbBitmaps: 2, directorySize: 64, directoryOffset: 0x50000 });
    expect(ext.unknownTypes).toEqual([0x12345678]);
    expect(featureNames((1n << 5n) | 1n, FEATURE_TYPE.autoclear, ext.featureNames)).toEqual(['bitmaps', 'x'.repeat(46)]);
  });

  it('refuses overruns and bad sizes, and takes the last of a repeated extension', () => {
    const overrun = cluster0([]);
    overrun.writeUInt32BE(EXT_BACKING_FORMAT, V3_HEADER_LENGTH);
    overrun.writeUInt32BE(70000, V3_HEADER_LENGTH + 4);
    expect(() => decodeExtensions(overrun, header())).toThrow(/runs past the header area/);
    // A repeated extension replaces the earlier one, as QEMU reads them.
    const twice = cluster0([encodeExtension(EXT_BACKING_FORMAT, Buffer.from('raw')), encodeExtension(EXT_BACKING_FORMAT, Buffer.from('qcow2'))]);
    expect(decodeExtensions(twice, header()).backingFormat).toBe('qcow2');
    expect(() => decodeExtensions(cluster0([encodeExtension(EXT_FEATURE_NAMES, Buffer.alloc(47))]), header())).toThrow(/not a multiple of 48/);
    expect(() => decodeExtensions(cluster0([encodeExtension(EXT_BITMAPS, Buffer.alloc(16))]), header())).toThrow(/bitmaps extension of 16 bytes/);
    // The extension area ends where the backing file name starts.
    const h = header({ backingFileOffset: V3_HEADER_LENGTH + 16, backingFileSize: 4 });
    expect(() => decodeExtensions(cluster0([encodeExtension(EXT_BACKING_FORMAT, Buffer.from('qcow2 format'))], h), h)).toThrow(/runs past the header area/);
  });

  it('refuses unknown incompatible bits by name, external data and encryption', () => {
    const ext = decodeExtensions(cluster0([encodeExtension(EXT_END, Buffer.alloc(0))]), header());
    expect(() => checkFeatures(header({ incompatibleFeatures: 1n << 33n }), ext)).toThrow(/unknown incompatible feature\(s\): unknown feature bit 33/);
    expect(() => checkFeatures(header({ incompatibleFeatures: 1n << 2n }), ext)).toThrow(/external data file/);
    expect(() => checkFeatures(header({ cryptMethod: 1 }), ext)).toThrow(/encrypted image \(crypt_method 1 AES\)/);
    // As qemu: the bitmaps autoclear bit without the extension means no bitmaps, and the external
    // data file extension without its incompatible bit is not used.
    expect(() => checkFeatures(header({ autoclearFeatures: 1n }), ext)).not.toThrow();
    expect(() => checkFeatures(header(), { ...ext, externalDataFile: 'data.raw' })).not.toThrow();
    expect(() => checkFeatures(header({ compatibleFeatures: 0xffn, autoclearFeatures: 1n << 60n }), ext)).not.toThrow();
  });
});

describe('table entries', () => {
  it('standard entries round-trip offset and flags', () => {
    const buf = Buffer.alloc(8);
    for (const off of [0, 0x200, 0x10000, 2 ** 40 + 0x10000, 2 ** 53 - 512]) {
      for (const [copied, zero] of [[false, false], [true, false], [true, true]] as const) {
        writeEntry(buf, 0, off, copied, zero);
        expect(entryOffset(buf.readUInt32BE(0), buf.readUInt32BE(4))).toBe(off);
        expect(buf.readUInt32BE(0) >>> 31).toBe(copied ? 1 : 0);
        expect(buf.readUInt32BE(4) & 1).toBe(zero ? 1 : 0);
      }
    }
  });

  it('compressed descriptors follow x = 62 - (cluster_bits - 8)', () => {
    // Observed from qemu-img with 64 KiB clusters: 0x4000000000050000 (offset 0x50000, 0 more sectors).
    expect(decodeCompressed(0x40000000, 0x00050000, 16)).toEqual({ offset: 0x50000, length: 512 });
    // 64 KiB clusters: x = 54, so sectors start at bit 54 (bit 22 of the high word).
    const hi = 0x40000000 | (3 << 22) | 0x1;
    expect(decodeCompressed(hi, 0x00000123, 16)).toEqual({ offset: 2 ** 32 + 0x123, length: 4 * 512 - 0x123 });
    // 2 MiB clusters: x = 49.
    expect(decodeCompressed(0x40000000 | (5 << 17), 0x200, 21)).toEqual({ offset: 0x200, length: 6 * 512 });
  });
});

describe('refcount packing', () => {
  it('stores every width and reads back what it stored', () => {
    for (let order = 0; order <= 6; order++) {
      const perBlock = (512 * 8) >> order;
      const block = Buffer.alloc(512);
      const values: number[] = [];
      for (let i = 0; i < perBlock; i++) {
        const v = Math.floor(((i * 2654435761) % 2 ** 31) % (Math.min(maxRefcount(order), 2 ** 40) + 1));
        values.push(v);
        setRefcount(block, i, order, v);
      }
      for (let i = 0; i < perBlock; i++) expect(getRefcount(block, i, order)).toBe(values[i]);
    }
  });

  it('packs sub-byte widths LSB first and wide ones big-endian', () => {
    const b = Buffer.alloc(8);
    setRefcount(b, 1, 0, 1);
    setRefcount(b, 7, 0, 1);
    expect(b[0]).toBe(0b10000010);
    b.fill(0);
    setRefcount(b, 1, 2, 0xa);
    expect(b[0]).toBe(0xa0);
    b.fill(0);
    setRefcount(b, 1, 4, 0x1234);
    expect([...b.subarray(2, 4)]).toEqual([0x12, 0x34]);
  });
});

describe('bitmap directory', () => {
  it('decodes entries with extra data and padding', () => {
    const e1 = Buffer.alloc(32);
    e1.writeBigUInt64BE(0x70000n, 0);
    e1.writeUInt32BE(1, 8);
    e1.writeUInt32BE(2, 12);
    e1[16] = 1;
    e1[17] = 16;
    e1.writeUInt16BE(2, 18);
    e1.write('b0', 24);
    const e2 = Buffer.alloc(40);
    e2.writeUInt32BE(3, 12);
    e2[17] = 20;
    e2.writeUInt16BE(5, 18);
    e2.writeUInt32BE(8, 20);
    e2.write('night', 32);
    const entries = decodeBitmapDirectory(Buffer.concat([e1, e2]), 2);
    expect(entries.map((e) => [e.name, e.flags, e.granularityBits, e.tableOffset])).toEqual([
      ['b0', 2, 16, 0x70000],
      ['night', 3, 20, 0],
    ]);
    expect(() => decodeBitmapDirectory(Buffer.concat([e1, e2]), 3)).toThrow(/truncated at entry 2/);
  });
});

describe('layoutNewImage', () => {
  it('lays out header, refcounts and L1 so that exactly the used clusters are counted', () => {
    for (const [clusterSize, size] of [[512, 2 ** 30], [65536, 5 * 2 ** 40], [2 ** 21, 2 ** 20]] as const) {
      const layout = layoutNewImage({ size, clusterSize, backingName: '../base.qcow2', backingFormat: 'qcow2' });
      const file = Buffer.alloc(layout.fileLength);
      for (const c of layout.chunks) c.data.copy(file, c.offset);
      const h = decodeHeader(file.subarray(0, clusterSize));
      const g = geometryOf(h);
      expect(h.size).toBe(size);
      const ext = decodeExtensions(file.subarray(0, clusterSize), h);
      expect(ext.backingFormat).toBe('qcow2');
      expect(file.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString()).toBe('../base.qcow2');
      const clusters = layout.fileLength / clusterSize;
      let counted = 0;
      const wrong: number[] = [];
      for (let t = 0; t < (h.refcountTableClusters * clusterSize) / 8; t++) {
        const blockOff = Number(file.readBigUInt64BE(h.refcountTableOffset + t * 8));
        if (!blockOff) continue;
        const block = file.subarray(blockOff, blockOff + clusterSize);
        for (let i = 0; i < g.refcountsPerBlock; i++) {
          const c = t * g.refcountsPerBlock + i;
          const v = getRefcount(block, i, h.refcountOrder);
          if (v !== (c < clusters ? 1 : 0)) wrong.push(c);
          counted += v;
        }
      }
      expect(wrong).toEqual([]);
      expect(counted).toBe(clusters);
      expect(h.l1TableOffset + h.l1Size * 8).toBeLessThanOrEqual(layout.fileLength);
    }
  });

  it('refuses sizes and names qcow2 cannot hold', () => {
    expect(() => layoutNewImage({ size: 2 ** 50, clusterSize: 512 })).toThrow(/L1 table over/);
    expect(() => layoutNewImage({ size: 1024, clusterSize: 3000 })).toThrow(/power of two/);
    expect(() => layoutNewImage({ size: 1024, clusterSize: 512, backingName: 'x'.repeat(400), backingFormat: 'qcow2' })).toThrow(/do not fit/);
  });
});
