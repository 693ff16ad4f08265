/**
 * Closing a writable qcow2 image while requests are still in flight (an NBD client that
 * disconnects mid-stream, or a caller that does not wait). Overwriting compressed clusters frees
 * their host clusters, and those frees reach the refcounts only through a commit: if close commits
 * before the requests finish, their metadata lands after the last commit (a leaked cluster on disk)
 * and their I/O goes to a closed, possibly reused, file descriptor.
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { Errno, NbddError } from '../../src/core/errors.js';
import { qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { run, tempDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const SIZE = 4 * MiB;
let dir: ReturnType<typeof tempDir>;
let compressed: string;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-close-');
  const plain = join(dir.path, 'plain.qcow2');
  qemuCreate(plain, SIZE, []);
  qemuIo(plain, [`write -P 0x33 0 ${8 * CLUSTER}`]);
  compressed = join(dir.path, 'compressed.qcow2');
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', plain, compressed]);
});
afterAll(() => dir.remove());

describe('qcow2 close with requests in flight', () => {
  it('waits for them, commits their frees, and refuses requests that arrive later', async () => {
    const path = join(dir.path, 'ours.qcow2');
    copyFileSync(compressed, path);
    const expected = qemuRaw(path, dir.path);
    const img = await openQcow2(path, { readOnly: false });
    // Partial overwrites (copy-on-write from the decompressed cluster), whole-cluster discards
    // and zero writes: each drops references to the shared compressed host cluster.
    const requests: Promise<unknown>[] = [];
    for (let i = 0; i < 8; i += 2) {
      requests.push(img.write(i * CLUSTER + 100, Buffer.alloc(1000, 0xa0 + i)));
      expected.fill(0xa0 + i, i * CLUSTER + 100, i * CLUSTER + 1100);
    }
    requests.push(img.trim(1 * CLUSTER, CLUSTER));
    expected.fill(0, 1 * CLUSTER, 2 * CLUSTER);
    requests.push(img.writeZeroes(3 * CLUSTER, CLUSTER));
    expected.fill(0, 3 * CLUSTER, 4 * CLUSTER);
    const closed = img.close();
    // Settled at once into a value, so its rejection is never unhandled while the others run.
    const late = img.write(7 * CLUSTER, Buffer.alloc(10, 1)).then(
      () => null,
      (err: unknown) => err,
    );
    const results = await Promise.allSettled([...requests, closed]);
    expect(results.map((r) => r.status)).toEqual(results.map(() => 'fulfilled'));
    const lateError = await late;
    expect(lateError).toBeInstanceOf(NbddError);
    expect((lateError as NbddError).errno).toBe(Errno.ESHUTDOWN);
    const check = qemuCheck(path);
    expect(check.output).toContain('No errors were found');
    expect(check.status).toBe(0);
    expect(qemuRaw(path, dir.path).equals(expected)).toBe(true);
  });
});
