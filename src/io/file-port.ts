/**
 * The four-method file port that image formats sit on, so the same qcow2 code runs on node:fs in
 * unit tests and on io_uring in production (see docs/architecture.md).
 *
 * Ownership: `readAt` fills and returns the caller's buffer (or a new one); `writeAt` reads the
 * caller's buffer until its promise settles.
 */
import fs from 'node:fs';
import { Errno, NbddError, fileError } from '../core/errors.js';
import { onUserspaceDevice } from '../kernel/holders.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, alignedBuffer, fallocate, preadNowait, voluntarySwitches } from '../sys/libc.js';
import { logger } from '../core/log.js';
import { tryCall } from '../core/try-call.js';

const log = logger('io');

/** Bytes to write at a file offset. */
export interface FilePiece {
  buf: Buffer;
  offset: number;
}

export interface FilePort {
  readonly path: string;
  readonly fd: number;
  readonly readOnly: boolean;
  /** Reads exactly `buf.length` bytes at `offset`; bytes past end of file read as zeroes. */
  readAt(buf: Buffer, offset: number): Promise<Buffer>;
  /** Writes all of `buf` at `offset`, extending the file if needed. */
  writeAt(buf: Buffer, offset: number): Promise<void>;
  /** Writes several buffers back to back starting at `offset` (one pwritev). */
  writevAt(bufs: Buffer[], offset: number): Promise<void>;
  /**
   * Writes every piece and makes those bytes durable before resolving, as `writeAt`s and an
   * `fsync` would, but where the engine can (io_uring's RWF_DSYNC) without waiting for the rest of
   * the file's dirty pages: the kernel writes back these ranges alone.
   */
  writeDurable(pieces: readonly FilePiece[]): Promise<void>;
  /** Deallocates a range; it reads as zeroes afterwards. Size unchanged. */
  punchHole(offset: number, length: number): Promise<void>;
  /** Zeroes a range, keeping it allocated where the filesystem can (ZERO_RANGE), else writes zeroes. */
  zeroRange(offset: number, length: number): Promise<void>;
  fsync(): Promise<void>;
  /** Current length of the file in bytes. */
  length(): Promise<number>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Where the port can: moves `length` bytes at `offset` into the pipe `pipeFd` by reference to the
   * page cache (splice), all of them or a rejection (the pipe then holds an unknown part).
   */
  spliceTo?(pipeFd: number, offset: number, length: number): Promise<void>;
  /**
   * Where the port can: writes `length` bytes from the pipe `pipeFd` at `offset` (splice; the
   * kernel copies them into the page cache), all of them or a rejection (the pipe then holds an
   * unknown part).
   */
  spliceFrom?(pipeFd: number, offset: number, length: number): Promise<void>;
}

/**
 * Page-aligned, so the zero-writing fallback also works on files opened with O_DIRECT. Made on
 * first use: filling it brings 1 MiB into every process, and most filesystems never need it.
 */
let zeroChunk: Buffer | null = null;

/**
 * How both ports zero a range: FALLOC_FL_ZERO_RANGE (keeps it allocated, costs no data writes)
 * until the filesystem first refuses it with ENOTSUP or EINVAL, then zero bytes written through
 * the port's own `write` from then on. Other errors (EIO, ENOSPC) are the request's.
 */
export class RangeZeroer {
  private zeroRangeWorks = true;

  constructor(
    private readonly zeroRange: (offset: number, length: number) => unknown,
    private readonly write: (buf: Buffer, offset: number) => Promise<void>,
  ) {}

  async zero(offset: number, length: number): Promise<void> {
    if (this.zeroRangeWorks) {
      try {
        await this.zeroRange(offset, length);
        return;
      } catch (err) {
        if (!(err instanceof NbddError) || (err.errno !== Errno.ENOTSUP && err.errno !== Errno.EINVAL)) throw err;
        this.zeroRangeWorks = false;
      }
    }
    zeroChunk ??= alignedBuffer(1024 * 1024, 4096).fill(0);
    for (let done = 0; done < length; ) {
      const n = Math.min(zeroChunk.length, length - done);
      await this.write(zeroChunk.subarray(0, n), offset + done);
      done += n;
    }
  }
}

/**
 * Largest read tried inline with RWF_NOWAIT. Small page-cache hits are cheapest on the event-loop
 * thread; a large one is a long memcpy there, which the engine's threads (or the kernel's) do in
 * parallel instead.
 */
export const INLINE_READ_MAX = 128 * 1024;

/** Largest write done inline (see `InlineWrites`). */
export const INLINE_WRITE_MAX = 128 * 1024;

/**
 * An inline write that took longer than this (ms) is taken to have slept (see `InlineWrites`):
 * a 128 KiB copy into the page cache takes tens of µs.
 */
export const SLOW_INLINE_WRITE_MS = 2;
/**
 * Inline writes less than this far apart (ms) belong to one burst and share one reading of the
 * thread's switch count (see `InlineWrites`).
 */
export const BASELINE_GAP_MS = 0.25;
/** The first backoff after a slow inline write (ms), its ceiling, and how long without slow writes resets it. */
export const INLINE_WRITE_BACKOFF_MS = 1000;
export const INLINE_WRITE_BACKOFF_MAX_MS = 60_000;
export const INLINE_WRITE_BACKOFF_RESET_MS = 300_000;

/** statfs f_type of tmpfs (also /dev/shm, /run) and ramfs: files whose pages live only in memory. */
const MEMORY_FS_MAGIC = new Set([0x01021994, 0x858458f6]);
/**
 * statfs f_type of the local disk filesystems whose buffered writes may run inline (see
 * InlineWrites): ext2/3/4, XFS, F2FS. Not network or FUSE filesystems, where a write can hang for
 * as long as a server takes; not btrfs, whose devices stat does not name (see onUserspaceDevice).
 */
const LOCAL_DISK_FS_MAGIC = new Set([0xef53, 0x58465342, 0xf2f52010]);

/**
 * Small buffered writes on the event-loop thread, for as long as they stay fast.
 *
 * A buffered write is a copy into the page cache, a few µs, unless the kernel makes it sleep:
 * dirty-page throttling, a journal commit, a partial page to read first, memory reclaim. ext4 and
 * tmpfs refuse RWF_NOWAIT for buffered writes, so io_uring cannot try one without sleeping and
 * hands each to one of its worker threads, and the thread pool always does: a thread wake-up and a
 * completion round trip around a copy (docs/io-engine.md, "Writes on the event-loop thread":
 * 47–59 µs of CPU per 4 KiB write through the workers, 29–34 inline).
 *
 * So small writes run inline and are timed. One slower than SLOW_INLINE_WRITE_MS that slept (the
 * thread's count of voluntary context switches rose during it) sends this file's writes to the
 * engine for a backoff of INLINE_WRITE_BACKOFF_MS, doubled for each further slow write up to
 * INLINE_WRITE_BACKOFF_MAX_MS, and back to the first value after INLINE_WRITE_BACKOFF_RESET_MS
 * without one. Under sustained throttling the loop thus sleeps at most once per backoff. A slow
 * write that did not sleep was preempted (a busy host, a VM's vCPU descheduled): no fault of the
 * file, so no backoff — on a loaded 2-vCPU VM such preemptions otherwise kept every write on the
 * engine (4 backoffs, 15 s, in one 9 s fio job).
 *
 * The count of switches is a system call (getrusage), as dear as a third of the 4 KiB write it
 * brackets, so it is read once for a run of writes rather than before each: at the first inline
 * write of a synchronous stretch of JavaScript (a batch of requests, a turn's completions), and
 * again after a write that ended more than BASELINE_GAP_MS after the one before it (something
 * between them may have slept). A slow write compares the count after it with that reading. So a
 * short sleep between two writes of one burst (a GC helper's futex, a page fault) makes a later
 * slow but preempted write of the same burst look as if it slept: one backoff too many, never one
 * too few.
 *
 * Never over a range that a write, writev, fallocate or truncate of this file still on the engine
 * covers: the inline write could land before the earlier one, and a table written twice would be
 * left stale. `track` records those ranges. (A count of them measured worse: on a busy fresh
 * qcow2 image one write on the engine let the next ones through only to the engine, and they kept
 * the count above zero, so 40 % of the writes never went inline again.) A write sent to the engine
 * instead lands after the earlier engine writes of the file, which io_uring's workers run one at a
 * time in order; after an earlier fallocate or truncate it has no such promise, as before.
 *
 * Only on files where no write can wait for long on something this loop must do or a server
 * elsewhere: memory filesystems, and local disk filesystems not on an NBD or ublk device (whose
 * writeback may need this very process to serve it) — see inlineIoFor.
 */
export class InlineWrites {
  /** Slow inline writes that slept (each started a backoff). */
  slowWrites = 0;
  /** Slow inline writes that did not sleep: the thread was preempted (no backoff). */
  preemptedWrites = 0;
  /** Byte ranges [start, end) of the file's mutations on the engine. */
  private readonly onEngine = new Set<{ start: number; end: number }>();
  private offloadUntil = -Infinity;
  private backoffMs = 0;
  private lastSlowAt = -Infinity;
  /** The thread's switch count at the start of this burst of writes, while `inStretch`. */
  private baseline = 0;
  /** True from the first inline write of a synchronous stretch until its microtasks run. */
  private inStretch = false;
  /** When the last inline write ended (ms, `now`). */
  private lastEnd = -Infinity;
  private readonly endStretch = (): void => {
    this.inStretch = false;
  };

  constructor(
    /** What the debug log calls the file. */
    private readonly name: string,
    private readonly now: () => number = () => performance.now(),
    private readonly write: (fd: number, buf: Buffer, off: number, len: number, pos: number) => number = fs.writeSync,
    /** The thread's voluntary context switches so far (see voluntarySwitches). */
    private readonly switches: () => number = voluntarySwitches,
  ) {}

  /**
   * Writes `buf` at `offset` on this thread and returns true, or returns false without writing:
   * the caller's engine must. Throws the system call's error.
   */
  tryWrite(fd: number, buf: Buffer, offset: number): boolean {
    if (buf.length > INLINE_WRITE_MAX) return false;
    const start = this.now();
    if (start < this.offloadUntil) return false;
    const last = offset + buf.length;
    for (const r of this.onEngine) if (offset < r.end && r.start < last) return false;
    if (!this.inStretch) {
      this.inStretch = true;
      queueMicrotask(this.endStretch);
      this.baseline = this.switches();
    } else if (start - this.lastEnd > BASELINE_GAP_MS) this.baseline = this.switches();
    try {
      for (let done = 0; done < buf.length; ) {
        const n = this.write(fd, buf, done, buf.length - done, offset + done);
        if (n <= 0) throw new NbddError(Errno.EIO, `cannot write ${this.name}: no progress at offset ${offset + done}`);
        done += n;
      }
    } catch (err) {
      throw fileError(this.name, err, 'cannot write');
    } finally {
      const end = this.now();
      this.lastEnd = end;
      if (end - start > SLOW_INLINE_WRITE_MS) {
        const after = this.switches();
        if (after !== this.baseline) this.slow(end, end - start);
        else this.preemptedWrites++;
        this.baseline = after;
      }
    }
    return true;
  }

  /**
   * Records `p`, a mutation of `length` bytes at `offset` on the engine (Infinity: to the end of
   * the file and beyond), until it settles.
   */
  track<T>(p: Promise<T>, offset: number, length: number): Promise<T> {
    const range = { start: offset, end: offset + length };
    this.onEngine.add(range);
    const settle = (): void => void this.onEngine.delete(range);
    p.then(settle, settle);
    return p;
  }

  private slow(at: number, tookMs: number): void {
    this.slowWrites++;
    this.backoffMs = at - this.lastSlowAt < INLINE_WRITE_BACKOFF_RESET_MS ? Math.min(this.backoffMs * 2, INLINE_WRITE_BACKOFF_MAX_MS) : INLINE_WRITE_BACKOFF_MS;
    this.lastSlowAt = at;
    this.offloadUntil = at + this.backoffMs;
    log.debug(`${this.name}: a write on the event-loop thread took ${tookMs.toFixed(1)} ms; writes go through the I/O engine for ${this.backoffMs / 1000} s`);
  }
}

/**
 * What may run on the event-loop thread for one open file, decided once at open:
 *
 * - `nowait`: reads try `preadv2(RWF_NOWAIT)` first (a page-cache hit completes in the same turn;
 *   a miss goes to the engine). Turned off for good when the kernel or filesystem refuses it.
 * - `memory`: the file lives on tmpfs or ramfs, where I/O never waits for a device but RWF_NOWAIT
 *   is refused, so io_uring would hand every read to a worker thread (and the thread pool always
 *   does): a thread wake-up and a completion round trip around a memcpy. Small reads are plain
 *   pread on this thread instead.
 * - `writes`: small buffered writes, inline while they stay fast (see InlineWrites).
 *
 * O_DIRECT files have none of these (their reads and writes would wait for the device).
 */
export interface InlineIo {
  nowait: boolean;
  memory: boolean;
  writes: InlineWrites | null;
}

/**
 * The inline policy for `fd`, freshly opened at `path` (see InlineIo). `sys` is the root of sysfs
 * (tests give a tree of their own).
 */
export function inlineIoFor(fd: number, direct: boolean, path: string, sys = '/sys'): InlineIo {
  if (direct) return { nowait: false, memory: false, writes: null };
  let memory = false;
  let inlineWrites = false;
  try {
    const st = fs.fstatSync(fd, { bigint: true });
    // statfs follows the /proc magic link to the open file itself (no race with a renamed path).
    const type = Number(fs.statfsSync(`/proc/self/fd/${fd}`).type);
    memory = st.isFile() && MEMORY_FS_MAGIC.has(type);
    inlineWrites = memory || (st.isFile() && LOCAL_DISK_FS_MAGIC.has(type) && !onUserspaceDevice(majorMinor(st.dev), { sys, proc: '/proc' }));
  } catch {
    // no /proc: the general path is always correct
  }
  return { nowait: !memory, memory, writes: inlineWrites ? new InlineWrites(path) : null };
}

/** "major:minor" of a st_dev (glibc's encoding). */
function majorMinor(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** pread until `buf` is full or end of file (the rest zeroed), on this thread. */
function readSyncFully(fd: number, buf: Buffer, offset: number): Buffer {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, offset + done);
    if (n === 0) {
      buf.fill(0, done);
      break;
    }
    done += n;
  }
  return buf;
}

/**
 * The read both ports share: inline per `inline` (see InlineIo), else `readSome(done)` (which
 * reads into `buf.subarray(done)` at `offset + done`) until `buf` is full. Bytes past end of file
 * read as zeroes.
 */
export function readFully(
  fd: number,
  buf: Buffer,
  offset: number,
  inline: InlineIo,
  readSome: (done: number) => Promise<number>,
): Promise<Buffer> {
  let done = 0;
  if (buf.length <= INLINE_READ_MAX) {
    if (inline.memory) return tryCall(() => readSyncFully(fd, buf, offset));
    if (inline.nowait) {
      try {
        const n = preadNowait(fd, buf, offset);
        if (n === 0) return Promise.resolve(buf.fill(0));
        if (n === buf.length) return Promise.resolve(buf);
        if (n > 0) done = n;
      } catch {
        inline.nowait = false;
      }
    }
  }
  return readRest(buf, done, readSome);
}

async function readRest(buf: Buffer, done: number, readSome: (done: number) => Promise<number>): Promise<Buffer> {
  while (done < buf.length) {
    const n = await readSome(done);
    if (n === 0) {
      buf.fill(0, done);
      break;
    }
    done += n;
  }
  return buf;
}

/** Promise wrappers over the fd callback API (cheaper per call than FileHandle). */
function pread(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function pwrite(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function pwritev(fd: number, bufs: Buffer[], pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.writev(fd, bufs, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

/**
 * FilePort on node:fs. Small reads first try the event-loop thread (see InlineIo: page-cache hits
 * complete without a thread-pool round trip), as do small buffered writes (see InlineWrites);
 * everything else goes through the pool.
 */
export class NodeFilePort implements FilePort {
  private closed = false;
  private readonly zeroer = new RangeZeroer(
    (offset, length) => fallocate(this.fd, FALLOC_FL_ZERO_RANGE, offset, length),
    (buf, offset) => this.writeAt(buf, offset),
  );
  /** What runs on the event-loop thread (see InlineIo); UringFilePort shares it. */
  readonly inline: InlineIo;

  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly readOnly: boolean,
    direct: boolean,
  ) {
    this.inline = inlineIoFor(fd, direct, path);
  }

  /** `exclusive` (with `create`) fails with EEXIST when the file exists (O_EXCL). */
  static async open(
    path: string,
    options: { readOnly: boolean; direct?: boolean; create?: boolean; exclusive?: boolean },
  ): Promise<NodeFilePort> {
    let flags = options.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    if (options.create) flags |= fs.constants.O_CREAT;
    if (options.exclusive) flags |= fs.constants.O_EXCL;
    if (options.direct) flags |= fs.constants.O_DIRECT;
    const fd = await new Promise<number>((resolve, reject) => fs.open(path, flags, 0o644, (err, fd) => (err ? reject(err) : resolve(fd))));
    return new NodeFilePort(path, fd, options.readOnly, !!options.direct);
  }

  readAt(buf: Buffer, offset: number): Promise<Buffer> {
    return readFully(this.fd, buf, offset, this.inline, (done) => pread(this.fd, buf, done, buf.length - done, offset + done));
  }

  async writeAt(buf: Buffer, offset: number): Promise<void> {
    this.assertWritable();
    if (this.inline.writes?.tryWrite(this.fd, buf, offset)) return;
    let done = 0;
    while (done < buf.length) done += await this.mutation(pwrite(this.fd, buf, done, buf.length - done, offset + done), offset + done, buf.length - done);
  }

  async writevAt(bufs: Buffer[], offset: number): Promise<void> {
    this.assertWritable();
    const total = bufs.reduce((n, b) => n + b.length, 0);
    const written = await this.mutation(pwritev(this.fd, bufs, offset), offset, total);
    if (written < total) {
      // Rare short write: finish with one contiguous buffer.
      await this.writeAt(Buffer.concat(bufs).subarray(written), offset + written);
    }
  }

  async punchHole(offset: number, length: number): Promise<void> {
    this.assertWritable();
    fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.assertWritable();
    await this.zeroer.zero(offset, length);
  }

  fsync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** node:fs has no pwritev2 flags: the writes, then an fdatasync of the whole file. */
  async writeDurable(pieces: readonly FilePiece[]): Promise<void> {
    await Promise.all(pieces.map((p) => this.writeAt(p.buf, p.offset)));
    await this.fsync();
  }

  length(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(err) : resolve(st.size))));
  }

  truncate(length: number): Promise<void> {
    this.assertWritable();
    // A truncate changes every byte from `length` on (and drops what a write past it adds).
    return this.mutation(new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, length, (err) => (err ? reject(err) : resolve()))), length, Infinity);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** `p`, a pool operation changing `length` bytes at `offset`, recorded for InlineWrites. */
  private mutation<T>(p: Promise<T>, offset: number, length: number): Promise<T> {
    return this.inline.writes ? this.inline.writes.track(p, offset, length) : p;
  }

  private assertWritable(): void {
    if (this.readOnly) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
  }
}
