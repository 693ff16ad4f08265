/** Reading cluster 0 of a qcow2 file: how much is read for each cluster size, and damaged headers. */
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createQcow2 } from '../../src/backends/qcow2/create.js';
import { readClusterZero } from '../../src/backends/qcow2/read-header.js';
import { HEADER } from '../../src/backends/qcow2/format/index.js';
import { NodeFilePort, type FilePort } from '../../src/io/file-port.js';

const dir = mkdtempSync(join(tmpdir(), 'nbdd-read-header-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Opens `path` and records the length of every read. */
async function counted(path: string): Promise<{ port: FilePort; reads: number[]; length: number }> {
  const port = await NodeFilePort.open(path, { readOnly: true });
  const reads: number[] = [];
  const readAt = port.readAt.bind(port);
  port.readAt = (buf: Buffer, offset: number) => {
    reads.push(buf.length);
    return readAt(buf, offset);
  };
  return { port, reads, length: await port.length() };
}

describe('readClusterZero', () => {
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(1 << 20));

  for (const [clusterSize, expected] of [
    [512, [65536]],
    [65536, [65536]],
    [2 * 1024 * 1024, [65536, 2 * 1024 * 1024]],
  ] as const) {
    it(`reads ${expected.join(' then ')} bytes for ${clusterSize}-byte clusters, and the backing name is in cluster 0`, async () => {
      const path = join(dir, `c${clusterSize}.qcow2`);
      await createQcow2(path, { size: 1 << 20, clusterSize, backing: 'base.raw', backingFormat: 'raw' });
      const { port, reads, length } = await counted(path);
      try {
        const z = await readClusterZero(port, length);
        expect(reads).toEqual(expected.map((n) => Math.min(n, length)));
        expect(z.geometry.clusterSize).toBe(clusterSize);
        expect(z.cluster0.length).toBe(Math.min(clusterSize, length));
        expect(z.extensions.backingFormat).toBe('raw');
        const name = z.cluster0.subarray(z.header.backingFileOffset, z.header.backingFileOffset + z.header.backingFileSize);
        expect(name.toString()).toBe('base.raw');
      } finally {
        await port.close();
      }
    });
  }

  it('names the bad field of a damaged header, whatever size it claims', async () => {
    const good = join(dir, 'good.qcow2');
    await createQcow2(good, { size: 1 << 20 });
    const bytes = readFileSync(good);
    for (const [bits, message] of [
      [40, /cluster_bits 40/],
      [0xffffffff, /cluster_bits 4294967295/],
    ] as const) {
      const path = join(dir, `bits${bits}.qcow2`);
      const copy = Buffer.from(bytes);
      copy.writeUInt32BE(bits, HEADER.clusterBits);
      writeFileSync(path, copy);
      const { port, length } = await counted(path);
      await expect(readClusterZero(port, length)).rejects.toThrow(message);
      await port.close();
    }
    // A header cut short: too few bytes for the fields, even though cluster_bits asks for 2 MiB.
    const short = join(dir, 'short.qcow2');
    const cut = Buffer.from(bytes.subarray(0, 40));
    cut.writeUInt32BE(21, HEADER.clusterBits);
    writeFileSync(short, cut);
    const { port, reads, length } = await counted(short);
    await expect(readClusterZero(port, length)).rejects.toThrow(/truncated/);
    expect(reads).toEqual([40]);
    await port.close();
  });
});
