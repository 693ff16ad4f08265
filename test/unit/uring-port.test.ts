/**
 * UringFilePort and UringEngine on real files under os.tmpdir(), checked against an in-memory
 * model. These tests need the addon (`npm run build:native`) and a kernel that allows io_uring.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, statSync, statfsSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import {
  BASELINE_GAP_MS,
  INLINE_READ_MAX,
  INLINE_WRITE_BACKOFF_MAX_MS,
  INLINE_WRITE_BACKOFF_MS,
  INLINE_WRITE_BACKOFF_RESET_MS,
  INLINE_WRITE_MAX,
  InlineWrites,
  NodeFilePort,
  inlineIoFor,
  type FilePort,
} from '../../src/io/file-port.js';
import { openFilePort } from '../../src/io/open-port.js';
import { URING_CQ_ENTRIES, UringEngine } from '../../src/io/uring-engine.js';
import { UringFilePort } from '../../src/io/uring-port.js';
import { alignedBuffer, voluntarySwitches } from '../../src/sys/libc.js';
import { prng } from '../helpers/prng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const ADDON = join(import.meta.dirname, '../../native/build/Release/nbdd_uring.node');

const dir = mkdtempSync(join(tmpdir(), 'nbdd-uring-'));
let seq = 0;
const ports: UringFilePort[] = [];

function engineOrFail(): UringEngine {
  try {
    return UringEngine.create();
  } catch (err) {
    throw new Error(`io_uring engine unavailable (build it with \`npm run build:native\`): ${String(err)}`);
  }
}
const engine = engineOrFail();

async function openNew(options: { direct?: boolean; size?: number } = {}): Promise<UringFilePort> {
  const path = join(dir, `f-${++seq}`);
  writeFileSync(path, '');
  const port = await UringFilePort.open(engine, path, { readOnly: false, direct: options.direct });
  if (options.size) await port.truncate(options.size);
  ports.push(port);
  return port;
}

/** Integers in [0, n) from the shared deterministic PRNG, so a failure replays. */
function rng(seed: number): (n: number) => number {
  const next = prng(seed);
  return (n) => Math.floor(next() * n);
}

function pattern(len: number, tag: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + tag * 7 + 1) & 0xff;
  return b;
}

afterEach(async () => {
  await Promise.all(ports.splice(0).map((p) => p.close()));
});
afterAll(() => {
  engine.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('UringFilePort', () => {
  it('matches a model under random concurrent reads, writes and writevs (more ops than the ring holds)', async () => {
    const size = 4 * MiB;
    const port = await openNew({ size });
    const model = Buffer.alloc(size);
    const rand = rng(0x5eed);
    // Rounds of concurrent writes to disjoint ranges, then concurrent reads of random ranges.
    for (let round = 0; round < 4; round++) {
      const writes: Promise<void>[] = [];
      const blocks = new Set<number>();
      while (blocks.size < 1500) blocks.add(rand(size / (2 * KiB)));
      for (const block of blocks) {
        const off = block * 2 * KiB + rand(512);
        const len = 1 + rand(2 * KiB - 512);
        const data = pattern(len, round * 10_000 + block);
        data.copy(model, off);
        if (rand(3) === 0) {
          const cut = rand(len);
          writes.push(port.writevAt([data.subarray(0, cut), data.subarray(cut)], off));
        } else {
          writes.push(port.writeAt(data, off));
        }
      }
      expect(writes.length).toBeGreaterThan(URING_CQ_ENTRIES);
      await Promise.all(writes);
      const reads = Array.from({ length: 1000 }, async () => {
        const off = rand(size - 8 * KiB);
        const len = 1 + rand(8 * KiB);
        const got = await port.readAt(Buffer.alloc(len, 0xee), off);
        expect(got.equals(model.subarray(off, off + len))).toBe(true);
      });
      await Promise.all(reads);
    }
    expect(readFileSync(port.path).equals(model)).toBe(true);
  });

  it('reads past end of file as zeroes through the ring (O_DIRECT skips the page-cache path)', async () => {
    const port = await openNew({ direct: true });
    const data = alignedBuffer(12 * KiB, 4096);
    pattern(12 * KiB, 3).copy(data);
    await port.writeAt(data, 0);
    await port.truncate(10_000); // a short last block: the kernel returns 10000 - 8192 bytes
    const buf = alignedBuffer(8 * KiB, 4096).fill(0xee);
    await port.readAt(buf, 8 * KiB);
    expect(buf.subarray(0, 10_000 - 8 * KiB).equals(data.subarray(8 * KiB, 10_000))).toBe(true);
    expect(buf.subarray(10_000 - 8 * KiB).every((b) => b === 0)).toBe(true);
    const beyond = alignedBuffer(4 * KiB, 4096).fill(0xee);
    await port.readAt(beyond, 64 * KiB);
    expect(beyond.every((b) => b === 0)).toBe(true);
  });

  it('reads a short file through the page-cache path and the ring alike', async () => {
    const port = await openNew();
    await port.writeAt(pattern(5000, 1), 0);
    const buf = Buffer.alloc(8192, 0xee);
    await port.readAt(buf, 0);
    expect(buf.subarray(0, 5000).equals(pattern(5000, 1))).toBe(true);
    expect(buf.subarray(5000).every((b) => b === 0)).toBe(true);
  });

  it('fsyncs, punches holes and zeroes ranges', async () => {
    const size = 2 * MiB;
    const port = await openNew({ size });
    await port.writeAt(pattern(size, 9), 0);
    await port.fsync();
    const allocated = statSync(port.path).blocks * 512;
    await port.punchHole(256 * KiB, MiB);
    await port.zeroRange(1536 * KiB, 64 * KiB);
    await port.fsync();
    const expected = pattern(size, 9);
    expected.fill(0, 256 * KiB, 256 * KiB + MiB);
    expected.fill(0, 1536 * KiB, 1600 * KiB);
    expect((await port.readAt(Buffer.alloc(size), 0)).equals(expected)).toBe(true);
    expect(statSync(port.path).blocks * 512).toBeLessThanOrEqual(allocated - MiB);
    expect(await port.length()).toBe(size);
  });

  it('writeDurable: one piece in a file that did not grow is one RWF_DSYNC write (the kernel takes the flag), several are writes and an fdatasync', async () => {
    const port = await openNew({ size: MiB });
    await port.fsync(); // the file's size is synced: a single piece goes as RWF_DSYNC
    const one = { buf: pattern(3000, 77), offset: 5000 };
    await port.writeDurable([one]);
    const pieces = Array.from({ length: 40 }, (_, i) => ({ buf: pattern(1000 + i, i), offset: i * 20 * KiB + i + 100 * KiB }));
    await port.writeDurable(pieces);
    const file = readFileSync(port.path);
    for (const p of [one, ...pieces]) expect(file.subarray(p.offset, p.offset + p.buf.length).equals(p.buf)).toBe(true);
    const path = join(dir, `ro-${++seq}`);
    writeFileSync(path, 'x');
    const ro = await UringFilePort.open(engine, path, { readOnly: true });
    ports.push(ro);
    await expect(ro.writeDurable([{ buf: Buffer.from('y'), offset: 0 }])).rejects.toMatchObject({ errno: Errno.EROFS });
  });

  it('close waits for operations in flight before closing the fd', async () => {
    const port = await openNew();
    const writes = Array.from({ length: 800 }, (_, i) => port.writeAt(pattern(4 * KiB, i), i * 4 * KiB));
    const closed = port.close();
    await Promise.all([...writes, closed]);
    const file = readFileSync(port.path);
    for (let i = 0; i < 800; i++) expect(file.subarray(i * 4 * KiB, (i + 1) * 4 * KiB).equals(pattern(4 * KiB, i))).toBe(true);
  });

  it('rejects with NbddError carrying the errno, and refuses writes on a read-only port', async () => {
    const path = join(dir, `ro-${++seq}`);
    writeFileSync(path, 'x');
    const ro = await UringFilePort.open(engine, path, { readOnly: true });
    ports.push(ro);
    await expect(ro.writeAt(Buffer.from('y'), 0)).rejects.toMatchObject({ errno: Errno.EROFS });
    // The kernel's own error for a write on an O_RDONLY fd comes back from the ring.
    const err = await engine.write(ro.fd, Buffer.from('y'), 0).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbddError);
    expect((err as NbddError).errno).toBe(Errno.EBADF);
  });
});

describe('InlineWrites: small buffered writes on the event-loop thread while they stay fast', () => {
  /**
   * A policy on a fake clock whose "system call" records writes and takes `cost` ms; a write
   * slower than 1 ms sleeps (a voluntary context switch) unless `clock.preempted`.
   */
  function fake(): { policy: InlineWrites; writes: number[]; clock: { t: number; cost: number; preempted: boolean; switches: number } } {
    const clock = { t: 1_000_000, cost: 0.005, preempted: false, switches: 0 };
    const writes: number[] = [];
    const policy = new InlineWrites(
      'fake',
      () => clock.t,
      (_fd, _buf, _off, len, pos) => {
        writes.push(pos);
        clock.t += clock.cost;
        if (clock.cost > 1 && !clock.preempted) clock.switches++;
        return len;
      },
      () => clock.switches,
    );
    return { policy, writes, clock };
  }
  const page = Buffer.alloc(4096);

  it('are on for files on a local disk filesystem, off where it lies on an NBD or ublk device', () => {
    const path = join(dir, `dev-${++seq}`);
    writeFileSync(path, 'x');
    const fd = openSync(path, 'r');
    const sys = mkdtempSync(join(tmpdir(), 'nbdd-sys-'));
    try {
      const dev = statSync(path, { bigint: true }).dev;
      const mm = `${((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn)}:${(dev & 0xffn) | ((dev >> 12n) & ~0xffn)}`;
      const local = inlineIoFor(fd, false, path, sys).writes; // an empty sysfs: no NBD device under it
      const fsType = Number(statfsSync(path).type);
      // ext2/3/4, XFS, F2FS, tmpfs get inline writes; elsewhere (say overlayfs) this test has nothing to show.
      if ([0xef53, 0x58465342, 0xf2f52010, 0x01021994].includes(fsType)) expect(local).toBeInstanceOf(InlineWrites);
      mkdirSync(join(sys, 'devices/virtual/block/nbd0/nbd0p1'), { recursive: true });
      mkdirSync(join(sys, 'dev/block'), { recursive: true });
      symlinkSync(join(sys, 'devices/virtual/block/nbd0/nbd0p1'), join(sys, 'dev/block', mm));
      if (fsType !== 0x01021994) expect(inlineIoFor(fd, false, path, sys).writes).toBeNull();
    } finally {
      closeSync(fd);
      rmSync(sys, { recursive: true, force: true });
    }
  });

  it('an inline write that fails rejects with the errno, naming the file; one that makes no progress is EIO', () => {
    const failing = new InlineWrites('/img', performance.now.bind(performance), () => {
      throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28 });
    });
    expect(() => failing.tryWrite(3, page, 0)).toThrow(expect.objectContaining({ errno: Errno.ENOSPC, message: expect.stringContaining('/img') }));
    const stuck = new InlineWrites('/img', performance.now.bind(performance), () => 0);
    expect(() => stuck.tryWrite(3, page, 0)).toThrow(expect.objectContaining({ errno: Errno.EIO }));
  });

  it('writes small buffers inline and leaves large ones to the engine', () => {
    const { policy, writes } = fake();
    expect(policy.tryWrite(3, page, 0)).toBe(true);
    expect(policy.tryWrite(3, Buffer.alloc(INLINE_WRITE_MAX), 8192)).toBe(true);
    expect(policy.tryWrite(3, Buffer.alloc(INLINE_WRITE_MAX + 1), 0)).toBe(false);
    expect(writes).toEqual([0, 8192]);
  });

  it('never overtakes a mutation of the same range still on the engine; other ranges go inline', async () => {
    const { policy, writes } = fake();
    let settle!: () => void;
    const onEngine = policy.track(new Promise<void>((resolve) => (settle = resolve)), 4096, 8192);
    expect(policy.tryWrite(3, page, 0)).toBe(true); // [0, 4096): just below
    expect(policy.tryWrite(3, page, 1)).toBe(false); // overlaps the first byte
    expect(policy.tryWrite(3, page, 8192)).toBe(false);
    expect(policy.tryWrite(3, page, 12287)).toBe(false); // overlaps the last byte
    expect(policy.tryWrite(3, page, 12288)).toBe(true); // just past
    settle();
    await onEngine;
    expect(policy.tryWrite(3, page, 8192)).toBe(true);
    // A truncate holds everything from its length on; a failed operation releases its range too.
    const truncate = policy.track(Promise.reject(new Error('EIO')), 1 << 20, Infinity);
    expect(policy.tryWrite(3, page, (1 << 20) - 1)).toBe(false);
    expect(policy.tryWrite(3, page, 2 ** 40)).toBe(false);
    await truncate.catch(() => {});
    expect(policy.tryWrite(3, page, 2 ** 40)).toBe(true);
    expect(writes).toEqual([0, 12288, 8192, 2 ** 40]);
  });

  it('a slow write backs off, doubling while slow ones recur, capped, and resetting after a quiet spell', () => {
    const { policy, clock } = fake();
    const slowWrite = (): void => {
      clock.cost = 5;
      expect(policy.tryWrite(3, page, 0)).toBe(true);
      clock.cost = 0.005;
    };
    /** How long (ms, to 1 ms) writes stay on the engine from now. */
    const backoff = (): number => {
      const from = clock.t;
      while (!policy.tryWrite(3, page, 0)) clock.t += 1;
      return Math.round(clock.t - from);
    };
    slowWrite();
    expect(backoff()).toBe(INLINE_WRITE_BACKOFF_MS);
    slowWrite();
    expect(backoff()).toBe(2 * INLINE_WRITE_BACKOFF_MS);
    for (let i = 0; i < 10; i++) {
      slowWrite();
      backoff();
    }
    slowWrite();
    expect(backoff()).toBe(INLINE_WRITE_BACKOFF_MAX_MS);
    clock.t += INLINE_WRITE_BACKOFF_RESET_MS;
    slowWrite();
    expect(backoff()).toBe(INLINE_WRITE_BACKOFF_MS);
    expect(policy.slowWrites).toBe(14);
  });

  it('a slow write that did not sleep (the thread was preempted) starts no backoff', () => {
    const { policy, clock } = fake();
    clock.cost = 5;
    clock.preempted = true;
    for (let i = 0; i < 3; i++) expect(policy.tryWrite(3, page, 0)).toBe(true);
    clock.cost = 0.005;
    expect(policy.tryWrite(3, page, 0)).toBe(true);
    expect([policy.preemptedWrites, policy.slowWrites]).toEqual([3, 0]);
  });

  it('reads the switch count once per burst of writes, again after a pause or a new stretch', async () => {
    const { policy, clock } = fake();
    let reads = 0;
    const counted = new InlineWrites(
      'fake',
      () => clock.t,
      (_fd, _buf, _off, len) => ((clock.t += clock.cost), len),
      () => (reads++, clock.switches),
    );
    for (let i = 0; i < 16; i++) expect(counted.tryWrite(3, page, i * 4096)).toBe(true);
    expect(reads).toBe(1); // one batch: one system call, not 16
    clock.t += BASELINE_GAP_MS * 2; // something ran in between, and may have slept
    counted.tryWrite(3, page, 0);
    expect(reads).toBe(2);
    await Promise.resolve(); // the stretch ends: the loop may sleep before the next one
    counted.tryWrite(3, page, 0);
    expect(reads).toBe(3);
    expect(policy.slowWrites).toBe(0);
  });

  it('a sleep before a burst, or between writes far apart, is not charged to a preempted write', async () => {
    const { policy, clock } = fake();
    const preemptedSlow = (): void => {
      clock.cost = 5;
      clock.preempted = true;
      expect(policy.tryWrite(3, page, 0)).toBe(true);
      clock.cost = 0.005;
      clock.preempted = false;
    };
    policy.tryWrite(3, page, 0);
    clock.switches++; // the loop slept waiting for events between two stretches
    await Promise.resolve();
    clock.t += BASELINE_GAP_MS / 10;
    preemptedSlow();
    policy.tryWrite(3, page, 0);
    clock.t += BASELINE_GAP_MS * 2;
    clock.switches++; // a GC or a page fault slept between two writes of one stretch
    preemptedSlow();
    expect([policy.preemptedWrites, policy.slowWrites]).toEqual([2, 0]);
    clock.cost = 5; // and a write that sleeps itself still backs off
    policy.tryWrite(3, page, 0);
    expect([policy.preemptedWrites, policy.slowWrites]).toEqual([2, 1]);
  });

  it("counts this thread's voluntary context switches: a sleep is one, a busy loop none", async () => {
    // A loop that calls nothing is preempted perhaps, never of its own accord. (The first round may
    // wait once for V8's compiler thread; the least of four rounds counts.)
    const rounds = [0, 1, 2, 3].map(() => {
      const before = voluntarySwitches();
      const stop = performance.now() + 10;
      while (performance.now() < stop);
      return voluntarySwitches() - before;
    });
    const busy = Math.min(...rounds);
    const sleeper = voluntarySwitches();
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20); // sleeps 20 ms in the kernel
    expect(busy).toBe(0);
    expect(voluntarySwitches() - sleeper).toBeGreaterThanOrEqual(1);
  });

  // io_uring runs a file's buffered writes one after another in the order they were queued; the
  // thread pool runs concurrent writes in parallel, so it never ordered them and is not tested here.
  it('a small write issued while a large one to the same range is on the ring lands after it', async () => {
    const port = await openNew();
    for (let round = 0; round < 20; round++) {
      const large = port.writeAt(Buffer.alloc(INLINE_WRITE_MAX * 2, 0x41 + (round % 8)), 0);
      const small = port.writeAt(Buffer.alloc(4096, 0x61 + (round % 8)), 4096);
      await Promise.all([large, small]);
      const got = await port.readAt(Buffer.alloc(3 * 4096), 0);
      expect([got[0], got[4096], got[8192]]).toEqual([0x41 + (round % 8), 0x61 + (round % 8), 0x41 + (round % 8)]);
    }
  });
});

describe('UringEngine', () => {
  it('close completes every operation already requested (ring and backlog), then rejects new ones with EBADF', async () => {
    const own = UringEngine.create();
    const port = await UringFilePort.open(own, join(dir, `e-${++seq}`), { readOnly: false, create: true });
    const writes = Array.from({ length: 2 * URING_CQ_ENTRIES }, (_, i) => own.write(port.fd, pattern(4 * KiB, i), i * 4 * KiB));
    expect(own.inFlight).toBe(URING_CQ_ENTRIES); // the other half waits in the backlog
    own.close();
    expect(await Promise.all(writes)).toEqual(writes.map(() => 4 * KiB));
    await expect(own.fdatasync(port.fd)).rejects.toMatchObject({ errno: Errno.EBADF });
    expect(own.inFlight).toBe(0);
    await port.close();
  });

  it('an idle ring does not keep the process alive, nor one left open after its I/O', () => {
    const script = `
      const a = require(${JSON.stringify(ADDON)});
      const fs = require('fs');
      const fd = fs.openSync(${JSON.stringify(join(dir, 'exit'))}, 'w+');
      let done = 0;
      const r = a.setup(8, 16, (pairs) => { done += pairs.length / 2; });
      a.write(r, fd, Buffer.from("hello"), 0, false);
      a.fsync(r, fd, true);
      process.on('exit', () => console.log('completions', done));
    `;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 10_000 });
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe('completions 2');
    expect(readFileSync(join(dir, 'exit'), 'utf8')).toBe('hello');
  });
});

describe('openFilePort', () => {
  const saved = process.env.NBDD_IO_ENGINE;
  afterEach(() => {
    if (saved === undefined) delete process.env.NBDD_IO_ENGINE;
    else process.env.NBDD_IO_ENGINE = saved;
  });

  it('uses io_uring by default and when asked, the thread pool when asked, and rejects other values', async () => {
    const path = join(dir, `o-${++seq}`);
    writeFileSync(path, 'abc');
    for (const [value, kind] of [[undefined, UringFilePort], ['uring', UringFilePort], ['threads', NodeFilePort]] as const) {
      if (value === undefined) delete process.env.NBDD_IO_ENGINE;
      else process.env.NBDD_IO_ENGINE = value;
      const port = await openFilePort(path, { readOnly: true });
      expect(port).toBeInstanceOf(kind);
      expect((await port.readAt(Buffer.alloc(3), 0)).toString()).toBe('abc');
      await port.close();
    }
    process.env.NBDD_IO_ENGINE = 'aio';
    await expect(openFilePort(path, { readOnly: true })).rejects.toMatchObject({ errno: Errno.EINVAL });
  });
});

// /dev/shm is tmpfs on Linux; without it there is nothing memory-backed to test here.
describe.runIf(existsSync('/dev/shm'))('memory-backed files (tmpfs): small I/O inline, large I/O on the engine', () => {
  const shm = mkdtempSync('/dev/shm/nbdd-inline-');
  afterAll(() => rmSync(shm, { recursive: true, force: true }));

  it('recognises tmpfs files, and never goes inline under O_DIRECT', () => {
    const path = join(shm, 'probe');
    writeFileSync(path, 'x');
    const fd = openSync(path, 'r');
    try {
      expect(inlineIoFor(fd, false, path)).toMatchObject({ nowait: false, memory: true, writes: expect.any(InlineWrites) });
      expect(inlineIoFor(fd, true, path)).toEqual({ nowait: false, memory: false, writes: null });
    } finally {
      closeSync(fd);
    }
  });

  for (const kind of ['uring', 'threads'] as const) {
    it(`${kind}: matches a model with reads and writes on both sides of the inline limit`, async () => {
      const path = join(shm, `model-${kind}`);
      writeFileSync(path, '');
      const options = { readOnly: false };
      const port: FilePort = kind === 'uring' ? await UringFilePort.open(engine, path, options) : await NodeFilePort.open(path, options);
      try {
        const size = 4 * MiB;
        await port.truncate(size);
        const model = Buffer.alloc(size);
        const rand = rng(0x7e3);
        for (let round = 0; round < 3; round++) {
          // Disjoint writes in flight together: small ones complete inline, large ones on the engine.
          const writes: Promise<void>[] = [];
          for (let slot = 0; slot < 16; slot++) {
            const len = rand(2) ? 1 + rand(8 * KiB) : INLINE_READ_MAX + 1 + rand(64 * KiB);
            const off = slot * 256 * KiB + rand(256 * KiB - len);
            const data = pattern(len, round * 100 + slot);
            data.copy(model, off);
            writes.push(port.writeAt(data, off));
          }
          await Promise.all(writes);
          await Promise.all(
            Array.from({ length: 40 }, async () => {
              const len = rand(2) ? 1 + rand(8 * KiB) : INLINE_READ_MAX + 1 + rand(64 * KiB);
              const off = rand(size + 4 * KiB - len); // some reads run past the end: zeroes
              const got = await port.readAt(Buffer.alloc(len, 0xee), off);
              const want = Buffer.alloc(len);
              model.copy(want, 0, off, Math.min(size, off + len));
              expect(got.equals(want)).toBe(true);
            }),
          );
        }
        expect(readFileSync(path).equals(model)).toBe(true);
      } finally {
        await port.close();
      }
    });
  }
});
