/**
 * The four-method file port that image formats sit on, so the same qcow2 code runs on node:fs in
 * unit tests and on io_uring in production (see docs/architecture.md).
 *
 * Ownership: `readAt` fills and returns the caller's buffer (or a new one); `writeAt` reads the
 * caller's buffer until its promise settles.
 */
import fs from 'node:fs';
import { Errno, NbddError } from '../core/errors.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, alignedBuffer, fallocate, preadNowait } from '../sys/libc.js';

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
  /** Deallocates a range; it reads as zeroes afterwards. Size unchanged. */
  punchHole(offset: number, length: number): Promise<void>;
  /** Zeroes a range, keeping it allocated where the filesystem can (ZERO_RANGE), else writes zeroes. */
  zeroRange(offset: number, length: number): Promise<void>;
  fsync(): Promise<void>;
  /** Current length of the file in bytes. */
  length(): Promise<number>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
}

/** Page-aligned, so the zero-writing fallback also works on files opened with O_DIRECT. */
const ZERO_CHUNK = alignedBuffer(1024 * 1024, 4096).fill(0);

/**
 * Largest read tried inline with RWF_NOWAIT. Small page-cache hits are cheapest on the event-loop
 * thread; a large one is a long memcpy there, which the engine's threads (or the kernel's) do in
 * parallel instead.
 */
export const INLINE_READ_MAX = 128 * 1024;

/**
 * The read loop both ports share: one inline RWF_NOWAIT attempt while `inline.on` (turned off
 * for good when the file or kernel refuses it), then `readSome(done)` (which reads into
 * `buf.subarray(done)` at `offset + done`) until `buf` is full. Bytes past end of file read as
 * zeroes.
 */
export async function readFully(
  fd: number,
  buf: Buffer,
  offset: number,
  inline: { on: boolean },
  readSome: (done: number) => Promise<number>,
): Promise<Buffer> {
  let done = 0;
  if (inline.on && buf.length <= INLINE_READ_MAX) {
    try {
      const n = preadNowait(fd, buf, offset);
      if (n === 0) return buf.fill(0);
      if (n > 0) done = n;
    } catch {
      inline.on = false;
    }
  }
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
 * FilePort on node:fs. Reads first try `preadNowait` on the event-loop thread (page-cache hits
 * complete without a thread-pool round trip) and fall back to the pool for the rest; writes, syncs
 * and cold reads always go through the pool.
 */
export class NodeFilePort implements FilePort {
  private closed = false;
  private zeroRangeWorks = true;
  /** Off on O_DIRECT files, and once the kernel or filesystem refused RWF_NOWAIT. */
  private readonly inlineReads: { on: boolean };

  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly readOnly: boolean,
    direct: boolean,
  ) {
    this.inlineReads = { on: !direct };
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
    return readFully(this.fd, buf, offset, this.inlineReads, (done) => pread(this.fd, buf, done, buf.length - done, offset + done));
  }

  async writeAt(buf: Buffer, offset: number): Promise<void> {
    this.assertWritable();
    let done = 0;
    while (done < buf.length) done += await pwrite(this.fd, buf, done, buf.length - done, offset + done);
  }

  async writevAt(bufs: Buffer[], offset: number): Promise<void> {
    this.assertWritable();
    const total = bufs.reduce((n, b) => n + b.length, 0);
    const written = await pwritev(this.fd, bufs, offset);
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
    if (this.zeroRangeWorks) {
      try {
        fallocate(this.fd, FALLOC_FL_ZERO_RANGE, offset, length);
        return;
      } catch (err) {
        if (!(err instanceof NbddError) || (err.errno !== Errno.ENOTSUP && err.errno !== Errno.EINVAL)) throw err;
        this.zeroRangeWorks = false;
      }
    }
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_CHUNK.length, length - done);
      await this.writeAt(ZERO_CHUNK.subarray(0, n), offset + done);
      done += n;
    }
  }

  fsync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  length(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(err) : resolve(st.size))));
  }

  truncate(length: number): Promise<void> {
    this.assertWritable();
    return new Promise((resolve, reject) => fs.ftruncate(this.fd, length, (err) => (err ? reject(err) : resolve())));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  private assertWritable(): void {
    if (this.readOnly) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
  }
}
