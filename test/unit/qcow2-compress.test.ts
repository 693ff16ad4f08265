/** Compressed cluster decoding: raw deflate and zstd, with the trailing bytes qcow2 leaves. */
import { deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { compressCluster, decompressCluster, decompressZstdFrameJs, zstdFrameLength } from '../../src/backends/qcow2/compress.js';

// Two back-to-back zstd frames as qemu-img 7.2 wrote them (64 KiB clusters of 0x5a and 0x11).
const ZSTD_TWO = Buffer.from('28b52ffd6000ff5500001' + '05a5a0100fb7f1d600128b52ffd6000ff55000010111101' + '00fb7f1d6001', 'hex');

describe('decompressCluster', () => {
  it('inflates raw deflate followed by unrelated bytes', async () => {
    const cluster = Buffer.alloc(65536);
    for (let i = 0; i < cluster.length; i++) cluster[i] = (i * 7) & 0xff;
    const src = Buffer.concat([deflateRawSync(cluster), Buffer.alloc(300, 0xee)]);
    expect((await decompressCluster(0, src, 65536)).equals(cluster)).toBe(true);
  });

  it('rejects deflate data that ends early or grows past the cluster', async () => {
    const cluster = Buffer.alloc(4096, 3);
    const whole = deflateRawSync(cluster);
    await expect(decompressCluster(0, whole, 8192)).rejects.toThrow(/decompressed to 4096 bytes, expected 8192/);
    await expect(decompressCluster(0, whole, 1024)).rejects.toThrow(/deflate/);
  });

  it('measures a zstd frame and decompresses only it', async () => {
    expect(zstdFrameLength(ZSTD_TWO)).toBe(20);
    expect(zstdFrameLength(ZSTD_TWO.subarray(20))).toBe(20);
    const a = await decompressCluster(1, ZSTD_TWO, 65536);
    expect(a.length).toBe(65536);
    expect(a.every((b) => b === 0x5a)).toBe(true);
    const b = await decompressCluster(1, ZSTD_TWO.subarray(20), 65536);
    expect(b.every((x) => x === 0x11)).toBe(true);
  });

  it('rejects damaged zstd frames', async () => {
    await expect(decompressCluster(1, Buffer.from('00000000000000', 'hex'), 65536)).rejects.toThrow(/no zstd frame magic/);
    await expect(decompressCluster(1, ZSTD_TWO.subarray(0, 12), 65536)).rejects.toThrow(/runs past the compressed data/);
    for (let n = 0; n < 20; n++) await expect(decompressCluster(1, ZSTD_TWO.subarray(0, n), 65536)).rejects.toThrow(/corrupt qcow2 image/);
  });

  it('decodes zstd in JavaScript (fzstd) where libzstd does not load: qemu\'s frames, libzstd\'s, and cut ones refused', async () => {
    const a = decompressZstdFrameJs(ZSTD_TWO.subarray(0, zstdFrameLength(ZSTD_TWO)), 65536);
    expect(a.length === 65536 && a.every((b) => b === 0x5a)).toBe(true);
    const cluster = Buffer.alloc(65536);
    for (let i = 0; i < cluster.length; i++) cluster[i] = (i % 251) ^ (i >> 9);
    const packed = await compressCluster(1, cluster, 65536 - 512);
    expect(packed).not.toBeNull();
    const frame = packed!.subarray(0, zstdFrameLength(packed!));
    expect(decompressZstdFrameJs(frame, 65536).equals(cluster)).toBe(true);
    expect((await decompressCluster(1, packed!, 65536)).equals(cluster)).toBe(true); // libzstd agrees
    // A frame cut short is refused, at every length (zstd frames carry no checksum by default, so a
    // flipped byte may decode to other bytes; the cluster length check catches what it can).
    for (let n = 1; n < frame.length; n += 7) expect(() => decompressZstdFrameJs(frame.subarray(0, n), 65536), `cut at ${n}`).toThrow(/corrupt qcow2 image/);
  });
});
