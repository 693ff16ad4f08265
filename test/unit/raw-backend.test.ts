/**
 * The raw backend on real sparse files under os.tmpdir(). Ranges are 64 KiB aligned, so the tests
 * hold on any filesystem whose hole granularity is at most 64 KiB (ext4, xfs, btrfs, tmpfs).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, statfsSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import koffi from 'koffi';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { RAW_DIRECT_ALIGNMENT, RAW_MAX_EXTENTS, RawBackend } from '../../src/backends/raw.js';
import { openImage as openAny } from '../../src/backends/open.js';
import { createQcow2 } from '../../src/backends/qcow2/index.js';
import { Errno } from '../../src/core/errors.js';
import { expectMatchesModel, fullStatus, runModel } from '../helpers/backend-model.js';

const K64 = 64 * 1024;
const MiB = 1024 * 1024;
const TMPFS_MAGIC = 0x01021994;

const dir = mkdtempSync(join(tmpdir(), 'nbdd-raw-'));
let seq = 0;
const open: RawBackend[] = [];

/** A path for a new image in the test directory. */
function imagePath(): string {
  return join(dir, `img-${++seq}.raw`);
}

async function create(size: number, options: { direct?: boolean; path?: string } = {}): Promise<RawBackend> {
  const b = await RawBackend.open(options.path ?? imagePath(), { create: size, direct: options.direct });
  open.push(b);
  return b;
}

async function openImage(path: string, readOnly = false): Promise<RawBackend> {
  const b = await RawBackend.open(path, { readOnly });
  open.push(b);
  return b;
}

/** Bytes the filesystem has allocated to the file. */
function allocated(path: string): number {
  return statSync(path).blocks * 512;
}

const hole = (length: number) => ({ length, hole: true, zero: true, depth: 0 });
const data = (length: number) => ({ length, hole: false, zero: false, depth: 1 });

afterEach(async () => {
  for (const b of open.splice(0)) await b.close();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('RawBackend: files', () => {
  it('creates a sparse file of the given size, all hole', async () => {
    const b = await create(8 * MiB);
    expect(b.size).toBe(8 * MiB);
    expect(statSync(b.path).size).toBe(8 * MiB);
    expect(allocated(b.path)).toBe(0);
    expect(await b.blockStatus(0, 8 * MiB)).toEqual([hole(8 * MiB)]);
    expect((await b.read(MiB - 7, 100)).equals(Buffer.alloc(100))).toBe(true);
    expect(b.caps).toMatchObject({ readOnly: false, flush: true, fua: false, trim: true, writeZeroes: true, fastZero: true, minBlockSize: 1 });
  });

  it('refuses to create over an existing file', async () => {
    const path = imagePath();
    writeFileSync(path, 'keep me');
    await expect(RawBackend.open(path, { create: MiB })).rejects.toMatchObject({ errno: Errno.EEXIST });
    expect(statSync(path).size).toBe(7);
  });

  it('reports written data exactly between holes, clipped to the query', async () => {
    const b = await create(4 * MiB);
    await b.write(MiB, Buffer.alloc(K64, 0x5a));
    await b.write(3 * MiB - K64, Buffer.alloc(2 * K64, 0xa5));
    expect(await b.blockStatus(0, 4 * MiB)).toEqual([hole(MiB), data(K64), hole(2 * MiB - 2 * K64), data(2 * K64), hole(MiB - K64)]);
    expect(await b.blockStatus(MiB + 4096, 8192)).toEqual([data(8192)]);
    expect(await b.blockStatus(MiB + 4096, 2 * K64)).toEqual([data(K64 - 4096), hole(K64 + 4096)]);
    const back = await b.read(MiB - 1, K64 + 2);
    expect(back[0]).toBe(0);
    expect(back.subarray(1, K64 + 1).every((x) => x === 0x5a)).toBe(true);
    expect(back[K64 + 1]).toBe(0);
  });

  it('trim punches a hole that reads as zeroes', async () => {
    const b = await create(MiB);
    await b.write(0, Buffer.alloc(MiB, 1));
    await b.flush();
    await b.trim(K64, 2 * K64);
    expect(await b.blockStatus(0, MiB)).toEqual([data(K64), hole(2 * K64), data(MiB - 3 * K64)]);
    expect((await b.read(K64, 2 * K64)).equals(Buffer.alloc(2 * K64))).toBe(true);
    expect(allocated(b.path)).toBe(MiB - 2 * K64);
  });

  it('write-zeroes punches without NO_HOLE and keeps the allocation with it', async () => {
    const b = await create(MiB);
    await b.write(0, Buffer.alloc(MiB, 2));
    await b.writeZeroes(0, 2 * K64);
    expect(allocated(b.path)).toBe(MiB - 2 * K64);
    await b.writeZeroes(4 * K64, 4 * K64, { noHole: true, fastZero: true });
    expect(allocated(b.path)).toBe(MiB - 2 * K64);
    const back = await b.read(0, MiB);
    expect(back.subarray(0, 2 * K64).equals(Buffer.alloc(2 * K64))).toBe(true);
    expect(back.subarray(2 * K64, 4 * K64).every((x) => x === 2)).toBe(true);
    expect(back.subarray(4 * K64, 8 * K64).equals(Buffer.alloc(4 * K64))).toBe(true);
    expect(back.subarray(8 * K64).every((x) => x === 2)).toBe(true);
    const status = await b.blockStatus(0, MiB);
    expect(status[0]).toEqual(hole(2 * K64));
  });

  it('matches a byte model under random operations', async () => {
    for (const seed of [11, 12]) {
      const b = await create(4 * MiB);
      const model = await runModel(b, { seed, operations: 150, granule: K64, maxGranules: 8 });
      await expectMatchesModel(b, model);
      // Holes are exact too: every hole extent is deallocated on disk (the model can't see that).
      // A fragmented file also owns a few extent-tree blocks, hence the slack.
      const holes = (await fullStatus(b)).filter((e) => e.hole).reduce((n, e) => n + e.length, 0);
      expect(allocated(b.path)).toBeLessThanOrEqual(b.size - holes + 4 * 4096);
    }
  });

  it('stops block status after RAW_MAX_EXTENTS extents', async () => {
    const count = RAW_MAX_EXTENTS / 2 + 1; // data/hole pairs: one pair more than fits
    const b = await create(count * 2 * K64);
    const one = Buffer.alloc(4096, 3);
    for (let i = 0; i < count; i++) await b.write(i * 2 * K64, one);
    const first = await b.blockStatus(0, b.size);
    expect(first.length).toBe(RAW_MAX_EXTENTS);
    expect(first[0]!.hole).toBe(false);
    expect(first[1]!.hole).toBe(true);
    const covered = first.reduce((n, e) => n + e.length, 0);
    expect(covered).toBe((RAW_MAX_EXTENTS / 2) * 2 * K64);
    expect((await fullStatus(b)).length).toBe(2 * count);
  });

  it('flushes on close and reopens with the data, read-only', async () => {
    const path = imagePath();
    const b = await RawBackend.open(path, { create: MiB });
    await b.write(K64, Buffer.from('persisted'));
    await b.close();
    await b.close();
    const ro = await openImage(path, true);
    expect(ro.size).toBe(MiB);
    expect(ro.caps).toMatchObject({ readOnly: true, flush: false, trim: false, writeZeroes: false });
    expect((await ro.read(K64, 9)).toString()).toBe('persisted');
    await expect(ro.write(0, Buffer.alloc(1))).rejects.toThrow(/read-only/);
  });

  it('asserts the range contract', async () => {
    const b = await create(MiB);
    const internal = { name: 'NbddError', errno: Errno.EIO };
    await expect(b.read(MiB - 1, 2)).rejects.toMatchObject(internal);
    await expect(b.read(0, 0)).rejects.toMatchObject(internal);
    await expect(b.write(-1, Buffer.alloc(2))).rejects.toMatchObject(internal);
    await expect(b.trim(MiB, 1)).rejects.toMatchObject(internal);
    await expect(b.writeZeroes(0, MiB + 1)).rejects.toMatchObject(internal);
    await expect(b.blockStatus(2 ** 53, 1)).rejects.toMatchObject(internal);
  });

  it('refuses what is not a file or block device, and missing files', async () => {
    const sub = join(dir, `dir-${++seq}`);
    mkdirSync(sub);
    await expect(RawBackend.open(sub, { readOnly: true })).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(RawBackend.open(join(dir, 'missing.raw'))).rejects.toMatchObject({ errno: Errno.ENOENT, message: /missing\.raw/ });
    await expect(RawBackend.open(imagePath(), { create: 0 })).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(RawBackend.open(imagePath(), { create: 4096, readOnly: true })).rejects.toMatchObject({ errno: Errno.EINVAL });
  });
});

describe('RawBackend: fast zeroes on a filesystem without ZERO_RANGE (tmpfs)', () => {
  it('fails fast with ENOTSUP under fastZero and writes zeroes otherwise', async () => {
    const shm = '/dev/shm';
    expect(statfsSync(shm).type, `${shm} must be tmpfs (mount -t tmpfs tmpfs /dev/shm)`).toBe(TMPFS_MAGIC);
    const path = join(shm, `nbdd-raw-test-${process.pid}-${++seq}.raw`);
    try {
      const b = await create(MiB, { path });
      await b.write(0, Buffer.alloc(MiB, 4));
      await expect(b.writeZeroes(0, K64, { noHole: true, fastZero: true })).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      expect((await b.read(0, 1))[0]).toBe(4);
      await b.writeZeroes(0, K64, { noHole: true });
      expect((await b.read(0, K64)).equals(Buffer.alloc(K64))).toBe(true);
      expect(allocated(path)).toBe(MiB);
      // Without NO_HOLE, tmpfs punches holes: fast, and deallocated.
      await b.writeZeroes(K64, K64, { fastZero: true });
      expect(allocated(path)).toBe(MiB - K64);
      expect(await b.blockStatus(0, 2 * K64)).toEqual([data(K64), hole(K64)]);
    } finally {
      rmSync(path, { force: true });
    }
  });
});

describe('RawBackend: O_DIRECT', () => {
  it('reads into page-aligned buffers and writes unaligned caller buffers', async () => {
    const b = await create(MiB, { direct: true });
    expect(b.caps.minBlockSize).toBe(RAW_DIRECT_ALIGNMENT);
    const payload = Buffer.alloc(4097 + 8192).subarray(1, 8193).fill(0x3c); // deliberately misaligned memory
    await b.write(2 * 4096, payload);
    const back = await b.read(4096, 4 * 4096);
    expect(Number(koffi.address(back) % BigInt(RAW_DIRECT_ALIGNMENT))).toBe(0);
    expect(back.subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(back.subarray(4096, 3 * 4096).every((x) => x === 0x3c)).toBe(true);
    expect(await b.blockStatus(0, 4 * 4096)).toEqual([hole(2 * 4096), data(2 * 4096)]);
    await b.writeZeroes(2 * 4096, 4096, { noHole: true });
    expect((await b.read(2 * 4096, 4096)).equals(Buffer.alloc(4096))).toBe(true);
  });

  it('needs a size that is a multiple of 4 KiB', async () => {
    await expect(RawBackend.open(imagePath(), { create: 5000, direct: true })).rejects.toMatchObject({ errno: Errno.EINVAL });
  });
});

describe('RawBackend: advisory lock', () => {
  it('refuses a second writer or a reader while a writer holds the file, in the same process', async () => {
    const path = imagePath();
    const writer = await RawBackend.open(path, { create: MiB });
    open.push(writer);
    await expect(RawBackend.open(path)).rejects.toMatchObject({ errno: Errno.EBUSY, message: expect.stringContaining(path) });
    await expect(RawBackend.open(path, { readOnly: true })).rejects.toMatchObject({
      errno: Errno.EBUSY,
      message: expect.stringMatching(/another process/),
    });
    await writer.close();
    const r1 = await openImage(path, true);
    const r2 = await openImage(path, true);
    expect(r1.size).toBe(r2.size);
    await expect(RawBackend.open(path)).rejects.toMatchObject({ errno: Errno.EBUSY });
  });

  it('holds a qcow2 image and a raw one to the same policy, raw and qcow2 mixed', async () => {
    const path = `${imagePath()}.qcow2`;
    await createQcow2(path, { size: MiB });
    const writer = await openAny(path, { format: 'qcow2' });
    try {
      await expect(openAny(path, { format: 'qcow2' })).rejects.toMatchObject({ errno: Errno.EBUSY, message: expect.stringContaining(path) });
      await expect(openAny(path, { format: 'qcow2', readOnly: true })).rejects.toMatchObject({ errno: Errno.EBUSY, message: expect.stringMatching(/another process/) });
      await expect(RawBackend.open(path, { readOnly: true })).rejects.toMatchObject({ errno: Errno.EBUSY });
    } finally {
      await writer.close();
    }
    const r1 = await openAny(path, { format: 'qcow2', readOnly: true });
    const r2 = await RawBackend.open(path, { readOnly: true });
    await expect(openAny(path, { format: 'qcow2' })).rejects.toMatchObject({ errno: Errno.EBUSY });
    await r1.close();
    await r2.close();
  });

  it('refuses a writer while another process holds the lock', async () => {
    const path = imagePath();
    writeFileSync(path, Buffer.alloc(4096));
    // util-linux flock(1) takes LOCK_EX on the file and runs a command while holding it.
    // --no-fork: the holder is flock's own pid, so killing it drops the lock.
    const holder: ChildProcess = spawn('flock', ['--exclusive', '--no-fork', path, 'sh', '-c', 'echo locked; exec sleep 30'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.once('error', (err) => reject(new Error(`flock(1) is missing (apt-get install util-linux): ${err.message}`)));
        holder.stdout!.once('data', () => resolve());
      });
      await expect(RawBackend.open(path)).rejects.toMatchObject({ errno: Errno.EBUSY, message: expect.stringContaining(path) });
      await expect(RawBackend.open(path, { readOnly: true })).rejects.toMatchObject({ errno: Errno.EBUSY });
    } finally {
      holder.kill('SIGTERM');
      await new Promise((resolve) => (holder.exitCode !== null ? resolve(null) : holder.once('exit', resolve)));
    }
    const b = await openImage(path);
    expect(b.size).toBe(4096);
  });
});

describe('RawBackend: a probed raw image never turns into a qcow2 image by a guest write', () => {
  const MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]); // "QFI\xfb"

  it('refuses (EPERM) writes that would put the qcow2 magic at offset 0, whole or pieced together; allows the rest', async () => {
    const path = imagePath();
    writeFileSync(path, Buffer.alloc(65536));
    const b = await openAny(path, {}); // format probed
    try {
      await expect(b.write(0, Buffer.concat([MAGIC, Buffer.alloc(508)]))).rejects.toMatchObject({ errno: Errno.EPERM, message: /format was probed as raw.*--format raw/ });
      await b.write(2, MAGIC.subarray(2)); // "\0\0I\xfb": harmless alone
      await expect(b.write(0, MAGIC.subarray(0, 2))).rejects.toMatchObject({ errno: Errno.EPERM }); // completes the magic
      await b.write(0, Buffer.alloc(512, 0xab));
      await b.write(4096, Buffer.concat([MAGIC, Buffer.alloc(508)])); // elsewhere: any bytes
      expect((await b.read(0, 4)).equals(Buffer.alloc(4, 0xab))).toBe(true);
    } finally {
      await b.close();
    }
    // Named as raw, the guest owns every byte.
    const named = await openAny(path, { format: 'raw' });
    try {
      await named.write(0, Buffer.concat([MAGIC, Buffer.alloc(508)]));
    } finally {
      await named.close();
    }
  });
});
