/**
 * Compressed writes (`writeCompressed`, compressed-write.ts) as qemu sees them: deflate and zstd
 * images, plain and extended L2, with and without a backing file, small and large clusters.
 * Each image is written by nbdd with a mix that exercises the packing (compressible clusters
 * whose streams share host clusters and run on into the next one, incompressible clusters that
 * go plain, zero clusters, unaligned heads and tails, concurrent requests), then must pass
 * `qemu-img check` with no leak and read back in qemu as the bytes written — and keep doing so
 * after nbdd overwrites, trims and zeroes some of the compressed clusters.
 */
import { randomBytes } from 'node:crypto';
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createQcow2 } from '../../src/backends/qcow2/create.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { COMPRESSION_DEFLATE, COMPRESSION_ZSTD } from '../../src/backends/qcow2/format/index.js';
import { qemuCheck, qemuCompare, qemuCreate, qemuIo, requireQemu } from '../helpers/qemu.js';
import { runStatus, tempDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-compressed-');
});
afterAll(() => dir.remove());

/** Bytes that compress to about a third (words from a small vocabulary, varied per seed and per 4 KiB). */
function compressible(length: number, seed: number): Buffer {
  const words = Array.from({ length: 64 }, (_, i) => `w${(i * 7919 + seed) % 1000}-${'x'.repeat(i % 9)} `);
  const base = Buffer.alloc(16 * KiB);
  let x = seed * 2654435761 + 1;
  for (let at = 0; at < base.length; ) {
    x = (x * 1103515245 + 12345) >>> 0;
    at += base.write(words[x % words.length]!, at);
  }
  const out = Buffer.alloc(length);
  for (let at = 0; at < length; at += base.length) base.copy(out, at);
  for (let at = 0; at + 16 <= length; at += 4 * KiB) randomBytes(16).copy(out, at + (seed % 64) * 16); // no two clusters alike
  return out;
}

/**
 * Writes the test pattern into `image` (opened here) and into `expected` (the raw truth, which
 * starts as `base` or zeroes). Returns the bytes handed to writeCompressed.
 */
async function writePattern(image: string, expected: Buffer, cs: number): Promise<number> {
  const img = await openQcow2(image, { readOnly: false });
  let written = 0;
  const put = async (offset: number, data: Buffer): Promise<void> => {
    data.copy(expected, offset);
    written += data.length;
    await img.writeCompressed(offset, data);
  };
  try {
    const size = expected.length;
    // 1. A long run of compressible clusters in one request: streams pack and run on.
    await put(0, compressible(24 * cs, 1));
    // 2. Incompressible clusters between compressible ones: those go plain.
    const mixed = Buffer.concat([randomBytes(cs), compressible(2 * cs, 2), randomBytes(2 * cs), compressible(cs, 3)]);
    await put(24 * cs, mixed);
    // 3. Zero clusters in the middle of data (over a backing file they must hide its bytes).
    await put(30 * cs, Buffer.concat([compressible(cs, 4), Buffer.alloc(2 * cs), compressible(cs, 5)]));
    // 4. Unaligned head and tail: the partial clusters take the plain path.
    await put(34 * cs + 1000, compressible(3 * cs, 6));
    // 5. Concurrent requests in one turn, out of order.
    await Promise.all([40, 47, 41, 46, 42, 45, 43, 44].map((c, i) => put(c * cs, compressible(cs, 10 + i))));
    // 6. The image's last cluster, partial when the size is not a multiple of the cluster.
    const lastCluster = Math.floor((size - 1) / cs) * cs;
    await put(lastCluster, compressible(size - lastCluster, 7));
    // 7. A cluster already mapped: rewritten in place, not compressed.
    await put(0, compressible(cs, 8));
    await img.flush();
  } finally {
    await img.close();
  }
  return written;
}

/** Compressed clusters as `qemu-img check` counts them (qemu 7.2's map does not show them). */
function compressedClusters(image: string): number {
  const r = runStatus('qemu-img', ['check', '--output=json', image]);
  return (JSON.parse(r.stdout) as { 'compressed-clusters'?: number })['compressed-clusters'] ?? 0;
}

const cases: { name: string; type: number; cs: number; size: number; extendedL2?: boolean; backing?: boolean }[] = [
  { name: 'deflate, 64 KiB clusters', type: COMPRESSION_DEFLATE, cs: 64 * KiB, size: 4 * MiB },
  { name: 'zstd, 64 KiB clusters, size not cluster-aligned', type: COMPRESSION_ZSTD, cs: 64 * KiB, size: 4 * MiB - 3 * 512 },
  { name: 'zstd, 4 KiB clusters', type: COMPRESSION_ZSTD, cs: 4 * KiB, size: 1 * MiB },
  { name: 'deflate, 2 MiB clusters', type: COMPRESSION_DEFLATE, cs: 2 * MiB, size: 128 * MiB },
  { name: 'zstd, extended L2', type: COMPRESSION_ZSTD, cs: 64 * KiB, size: 4 * MiB, extendedL2: true },
  { name: 'zstd over a backing file', type: COMPRESSION_ZSTD, cs: 64 * KiB, size: 4 * MiB, backing: true },
];

describe('writeCompressed: images qemu reads', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const image = join(dir.path, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      const truth = `${image}.raw`;
      const expected = Buffer.alloc(c.size);
      if (c.backing) {
        const base = `${image}.base.qcow2`;
        qemuCreate(base, c.size);
        qemuIo(base, ['write -P 0x5a 0 ' + c.size]);
        expected.fill(0x5a);
        await createQcow2(image, { backing: base.split('/').pop()!, backingFormat: 'qcow2', clusterSize: c.cs, compressionType: c.type });
      } else if (c.extendedL2) {
        qemuCreate(image, c.size, [`cluster_size=${c.cs}`, 'extended_l2=on', `compression_type=${c.type === COMPRESSION_ZSTD ? 'zstd' : 'zlib'}`]);
      } else {
        await createQcow2(image, { size: c.size, clusterSize: c.cs, compressionType: c.type });
      }
      const written = await writePattern(image, expected, c.cs);
      writeFileSync(truth, expected);

      const check = qemuCheck(image);
      expect(check.status, check.output).toBe(0);
      expect(qemuCompare(truth, image, 'raw', 'qcow2').status).toBe(0);
      expect(compressedClusters(image)).toBeGreaterThanOrEqual(20); // runs 1, 2, 3, 5 at least
      // Smaller than what was written, though incompressible clusters and metadata are in it too.
      expect(statSync(image).blocks * 512).toBeLessThan(written); // allocated: the pool's reservations are holes
      // nbdd reads it back too.
      const img = await openQcow2(image, { readOnly: true });
      try {
        expect((await img.read(0, c.size)).equals(expected)).toBe(true);
      } finally {
        await img.close();
      }

      // Compressed clusters overwritten, trimmed and zeroed: shared host clusters lose one count
      // each, and those left with none are freed — qemu must find no leak and no lost reference.
      const rw = await openQcow2(image, { readOnly: false });
      try {
        for (const [i, cl] of [1, 3, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17].entries()) {
          const data = i % 3 === 0 ? Buffer.alloc(c.cs) : compressible(c.cs, 100 + i);
          if (i % 3 === 0) await rw.trim(cl * c.cs, c.cs);
          else if (i % 3 === 1) await rw.write(cl * c.cs + 512, data.subarray(0, c.cs - 512));
          else await rw.writeZeroes(cl * c.cs, c.cs);
          if (i % 3 === 0) {
            // What a trim leaves is the image's choice (zeroes, or the backing file showing through).
            const left = await rw.read(cl * c.cs, c.cs);
            expect(left.equals(Buffer.alloc(c.cs)) || (c.backing === true && left.equals(Buffer.alloc(c.cs, 0x5a)))).toBe(true);
            left.copy(expected, cl * c.cs);
          } else if (i % 3 === 1) data.copy(expected, cl * c.cs + 512, 0, c.cs - 512);
          else expected.fill(0, cl * c.cs, (cl + 1) * c.cs);
        }
        // And a new compressed run after the frees, packed into what they released.
        const more = compressible(4 * c.cs, 200);
        more.copy(expected, 50 * c.cs);
        await rw.writeCompressed(50 * c.cs, more);
        await rw.flush();
      } finally {
        await rw.close();
      }
      writeFileSync(truth, expected);
      const check2 = qemuCheck(image);
      expect(check2.status, check2.output).toBe(0);
      expect(qemuCompare(truth, image, 'raw', 'qcow2').status).toBe(0);
    });
  }

  it('refuses nothing, compresses nothing, when the data does not compress', async () => {
    const image = join(dir.path, 'random.qcow2');
    await createQcow2(image, { size: 2 * MiB, compressionType: COMPRESSION_ZSTD });
    const data = randomBytes(2 * MiB);
    const img = await openQcow2(image, { readOnly: false });
    try {
      await img.writeCompressed(0, data);
    } finally {
      await img.close();
    }
    expect(compressedClusters(image)).toBe(0);
    writeFileSync(`${image}.raw`, data);
    expect(qemuCompare(`${image}.raw`, image, 'raw', 'qcow2').status).toBe(0);
    expect(qemuCheck(image).status).toBe(0);
  });
});
