/**
 * Opening: feature bits, header extensions, the dirty and corrupt bits, and damaged images.
 * Every damaged image must fail with a clear message naming what is wrong, without crashing and
 * without a single byte (or the mtime) of the file changing, for read-only and writable opens.
 */
import { readFileSync, statSync, truncateSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { openQcow2 } from '../../src/backends/qcow2/open.js';
import { describeQcow2 } from '../../src/backends/qcow2/describe.js';
import { decodeHeader } from '../../src/backends/qcow2/format/index.js';
import { qemuCheck, qemuCreate, qemuIo, qemuRaw, requireQemu } from '../helpers/qemu.js';
import { patch, u64, u32 } from '../helpers/patch.js';
import { run, runStatus, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
let dir: ReturnType<typeof tempDir>;
let n = 0;

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-open-');
});
afterAll(() => dir.remove());

/** A 4 MiB v3 image with 64 KiB clusters and data at 0 and 2 MiB (one L2 table). */
function goodImage(opts: string[] = []): string {
  const path = join(dir.path, `img-${n++}.qcow2`);
  qemuCreate(path, 4 * MiB, opts);
  qemuIo(path, ['write -P 0x11 0 128k', 'write -P 0x22 2M 64k']);
  return path;
}

function header(path: string) {
  return decodeHeader(readFileSync(path).subarray(0, 4096));
}

/** Offset of the first L2 table and of the data cluster at guest 0. */
function firstL2(path: string): { l2: number; data: number } {
  const file = readFileSync(path);
  const h = header(path);
  const l2 = Number(file.readBigUInt64BE(h.l1TableOffset) & 0x00fffffffffffe00n);
  const data = Number(file.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
  return { l2, data };
}

/** Opens (read-only and writable) and reads everything; returns the error messages. */
async function failures(path: string): Promise<NbddError[]> {
  const errors: NbddError[] = [];
  for (const readOnly of [true, false]) {
    try {
      const img = await openQcow2(path, { readOnly });
      try {
        await img.read(0, img.size);
      } finally {
        await img.close();
      }
    } catch (err) {
      expect(err).toBeInstanceOf(NbddError);
      errors.push(err as NbddError);
    }
  }
  return errors;
}

/** Asserts both opens fail with `pattern`, and the file is untouched (bytes and mtime). */
async function expectRefused(path: string, pattern: RegExp): Promise<void> {
  utimesSync(path, new Date(1_000_000_000_000), new Date(1_000_000_000_000));
  const before = readFileSync(path);
  const mtime = statSync(path).mtimeMs;
  const errors = await failures(path);
  expect(errors.map((e) => e.message)).toHaveLength(2);
  for (const e of errors) expect(e.message).toMatch(pattern);
  expect(readFileSync(path).equals(before)).toBe(true);
  expect(statSync(path).mtimeMs).toBe(mtime);
}

describe('qcow2 damaged images', () => {
  it('L2 table offset past the end of the file', async () => {
    const p = goodImage();
    patch(p, header(p).l1TableOffset, u64(0x8000000000000000n | BigInt(64 * MiB)));
    await expectRefused(p, /L1 entry 0: L2 table at 0x4000000 lies past the end of the file/);
  });

  it('data cluster offset past the end of the file', async () => {
    const p = goodImage();
    patch(p, firstL2(p).l2, u64(0x8000000000000000n | BigInt(64 * MiB)));
    // Read-only: the entry fails the read; writable: the open-time check refuses the image.
    await expectRefused(p, /guest offset 0x0 points at 0x4000000, past the end of the file|region 0x4000000\+0x10000 reaches past the end of the file/);
  });

  it('unaligned L1 table offset', async () => {
    const p = goodImage();
    patch(p, 40, u64(header(p).l1TableOffset + 512));
    await expectRefused(p, /l1_table_offset 0x30200 is not aligned/);
  });

  it('unaligned data cluster offset in an L2 entry', async () => {
    const p = goodImage();
    patch(p, firstL2(p).l2, u64(0x8000000000000000n | BigInt(firstL2(p).data + 4096)));
    await expectRefused(p, /unaligned host offset|offset 0x[0-9a-f]+ is not cluster aligned/);
  });

  it('L2 table overlapping the refcount table', async () => {
    const p = goodImage();
    patch(p, header(p).l1TableOffset, u64(0x8000000000000000n | BigInt(header(p).refcountTableOffset)));
    await expectRefused(p, /overlapping metadata: cluster 0x10000 is both the refcount table and an L2 table/);
  });

  it('refcount table loop (a refcount block that is the refcount table)', async () => {
    const p = goodImage();
    const h = header(p);
    patch(p, h.refcountTableOffset + 8, u64(h.refcountTableOffset));
    utimesSync(p, new Date(1_000_000_000_000), new Date(1_000_000_000_000));
    const before = readFileSync(p);
    // Read-only opens do not load refcounts; writable ones must refuse.
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/overlapping metadata: cluster 0x10000 is both the refcount table and refcount block 1/);
    expect(readFileSync(p).equals(before)).toBe(true);
  });

  it('two refcount table entries naming the same block', async () => {
    const p = goodImage();
    const h = header(p);
    const first = readFileSync(p).subarray(h.refcountTableOffset, h.refcountTableOffset + 8);
    patch(p, h.refcountTableOffset + 8, Buffer.from(first));
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/overlapping metadata: cluster 0x20000 is both refcount block 0 and refcount block 1/);
  });

  it('absurd virtual size', async () => {
    const p = goodImage();
    patch(p, 24, u64(1n << 60n));
    await expectRefused(p, /size 0x1000000000000000 is too large/);
  });

  it('L1 table too small for the virtual size', async () => {
    const p = goodImage();
    patch(p, 24, u64(1n << 40n));
    await expectRefused(p, /l1_size 1 too small for virtual size/);
  });

  it('cluster_bits out of range', async () => {
    const p = goodImage();
    patch(p, 20, u32(30));
    await expectRefused(p, /cluster_bits 30 \(supported 9\.\.21/);
  });

  it('refcount_order out of range', async () => {
    const p = goodImage();
    patch(p, 96, u32(7));
    await expectRefused(p, /refcount_order 7/);
  });

  it('truncated header', async () => {
    const p = goodImage();
    truncateSync(p, 90);
    await expectRefused(p, /truncated v3 header \(90 bytes, need 104\)/);
    truncateSync(p, 40);
    await expectRefused(p, /truncated header \(40 bytes, need 72\)/);
  });

  it('bad magic', async () => {
    const p = goodImage();
    patch(p, 0, u32(0x12345678));
    await expectRefused(p, /bad magic 0x12345678/);
  });
});

describe('qcow2 features at open', () => {
  it('refuses an unknown incompatible bit by its name from the feature name table', async () => {
    const p = goodImage();
    // Rename the image's 'dirty bit' entry (type 0, bit 0) to describe bit 7.
    const file = readFileSync(p);
    const table = file.indexOf(Buffer.from('dirty bit'));
    expect(table).toBeGreaterThan(0);
    const entry = Buffer.alloc(48);
    entry[0] = 0;
    entry[1] = 7;
    entry.write('time travel', 2);
    patch(p, table - 2, entry);
    patch(p, 72, u64(1n << 7n));
    await expectRefused(p, /unknown incompatible feature\(s\): time travel/);
    patch(p, 72, u64(1n << 9n));
    await expectRefused(p, /unknown incompatible feature\(s\): unknown feature bit 9/);
  });

  it('ignores unknown compatible bits and clears unknown autoclear bits on writable open', async () => {
    const p = goodImage();
    patch(p, 80, u64(1n << 20n));
    patch(p, 88, u64(1n << 40n));
    const ro = await openQcow2(p, { readOnly: true });
    await ro.close();
    expect(header(p).autoclearFeatures).toBe(1n << 40n);
    const rw = await openQcow2(p, { readOnly: false });
    await rw.flush();
    await rw.close();
    expect(header(p).autoclearFeatures).toBe(0n);
    expect(header(p).compatibleFeatures).toBe(1n << 20n);
  });

  it('keeps the bitmaps extension but clears the bitmaps autoclear bit on writable open', async () => {
    const p = goodImage();
    run('qemu-img', ['bitmap', '--add', '-g', '65536', p, 'b0']);
    run('qemu-img', ['bitmap', '--add', '--disable', p, 'b1']);
    expect(header(p).autoclearFeatures & 1n).toBe(1n);
    const info = await describeQcow2(p);
    expect(info.bitmaps).toEqual([
      { name: 'b0', granularity: 65536, flags: ['auto'] },
      { name: 'b1', granularity: 65536, flags: [] },
    ]);
    expect(info.bitmapsConsistent).toBe(true);
    const img = await openQcow2(p, { readOnly: false });
    expect(img.extensions.bitmaps?.nbBitmaps).toBe(2);
    await img.write(4096, Buffer.alloc(4096, 0x99));
    await img.close();
    expect(header(p).autoclearFeatures & 1n).toBe(0n);
    expect((await describeQcow2(p)).bitmapsConsistent).toBe(false);
    // QEMU now ignores the bitmaps (a program without bitmap support touched the image), so their
    // clusters count as leaked: never as corruption.
    const check = qemuCheck(p);
    expect(check.output).not.toMatch(/ERROR/);
    expect([0, 3]).toContain(check.status);
  });

  it('dirty bit (lazy refcounts, qemu-io aborted): read-only reads it as is; a writable open rebuilds the refcounts first, as qemu does', async () => {
    const p = goodImage(['lazy_refcounts=on']);
    const expected = qemuRaw(p, dir.path);
    runStatus('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 1M 64k', '-c', 'abort', p]);
    expect(header(p).incompatibleFeatures & 1n).toBe(1n);
    expected.fill(0x33, MiB, MiB + 65536);
    const before = readFileSync(p);
    const img = await openQcow2(p, { readOnly: true });
    expect((await img.read(0, img.size)).equals(expected)).toBe(true);
    await img.close();
    expect(readFileSync(p).equals(before)).toBe(true); // read-only: not a byte changed
    const rw = await openQcow2(p, { readOnly: false });
    await rw.write(2 * MiB, Buffer.alloc(65536, 0x44));
    await rw.close();
    expected.fill(0x44, 2 * MiB, 2 * MiB + 65536);
    expect(header(p).incompatibleFeatures & 1n).toBe(0n);
    expect(qemuRaw(p, dir.path).equals(expected)).toBe(true);
    expect(qemuCheck(p).status).toBe(0);
  });

  it('corrupt bit: read-only works, writable refused', async () => {
    const p = goodImage();
    patch(p, 72, u64(2n));
    const img = await openQcow2(p, { readOnly: true });
    expect((await img.read(0, 4096)).every((b) => b === 0x11)).toBe(true);
    await img.close();
    await expect(openQcow2(p, { readOnly: false })).rejects.toThrow(/marked corrupt.*nbdd check --repair all/);
  });

  it('refuses external data files and encryption clearly', async () => {
    const ext = join(dir.path, 'ext.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir.path, 'ext.data')}`, ext, '1M']);
    await expectRefused(ext, /external data file '.*ext\.data' \(not implemented by nbdd\)/);
    // crypt_method 1 (AES) and 2 (LUKS) set in a header qemu-img made: what nbdd refuses on.
    for (const [method, name] of [[1, 'AES'], [2, 'LUKS']] as const) {
      const p = join(dir.path, `crypt-${method}.qcow2`);
      qemuCreate(p, MiB);
      patch(p, 32, u32(method));
      await expectRefused(p, new RegExp(`encrypted image \\(crypt_method ${method} ${name}\\)`));
    }
    // And a LUKS image qemu-img made (crypt_method 2 and the encryption header extension), where
    // qemu-img manages to make one: it times its PBKDF on the thread's CPU clock and fails with
    // "Unable to get accurate CPU usage" whenever that clock shows 0 ms (CI saw five such
    // failures in a row), which is qemu-img's trouble, not nbdd's.
    const enc = join(dir.path, 'enc.qcow2');
    for (let attempt = 1; attempt <= 5; attempt++) {
      const r = runStatus('qemu-img', ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=secret', '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', enc, '1M']);
      if (r.status === 0) {
        await expectRefused(enc, /encrypted image \(crypt_method 2 LUKS\)/);
        return;
      }
      if (!/accurate CPU usage/.test(r.stderr)) throw new Error(`qemu-img create of a LUKS image failed: ${r.stderr}`);
    }
    console.log('qemu-img could not make a LUKS image (Unable to get accurate CPU usage, 5 times); the patched headers above stand for it');
  });

  it('refuses backing chain loops', async () => {
    const a = join(dir.path, 'loop-a.qcow2');
    const b = join(dir.path, 'loop-b.qcow2');
    qemuCreate(a, MiB);
    qemuCreate(b, MiB, [], { path: a, format: 'qcow2' });
    run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', b, '-F', 'qcow2', a]);
    await expect(openQcow2(b, { readOnly: true })).rejects.toMatchObject({ errno: Errno.ELOOP, message: expect.stringMatching(/backing chain loop/) });
  });

  it('refuses a NUL in the backing file name with its own message, naming the field', async () => {
    const base = join(dir.path, 'nul-base.qcow2');
    qemuCreate(base, MiB);
    const top = join(dir.path, 'nul-top.qcow2');
    qemuCreate(top, MiB, [], { path: base, format: 'qcow2' });
    const h = header(top);
    patch(top, h.backingFileOffset + 3, Buffer.from([0]));
    await expectRefused(top, /backing file name \(backing_file_offset \d+, \d+ bytes\) contains a NUL byte/);
  });

  it('opens, as QEMU does, a backing file offset with size 0: no backing file', async () => {
    const path = goodImage();
    patch(path, 8, u64(65000)); // backing_file_offset, backing_file_size stays 0
    expect(runStatus('qemu-img', ['info', path]).status).toBe(0);
    const img = await openQcow2(path, { readOnly: true });
    try {
      expect(img.backingName).toBeNull();
      expect((await img.read(0, 4)).equals(Buffer.alloc(4, 0x11))).toBe(true);
    } finally {
      await img.close();
    }
  });
});
