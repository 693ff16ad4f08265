/**
 * The four-method file port that image formats sit on, so the same qcow2 code runs on node:fs in
 * unit tests and on io_uring in production (see docs/architecture.md).
 *
 * Ownership: `readAt` fills and returns the caller's buffer (or a new one); `writeAt` reads the
 * caller's buffer until its promise settles.
 */
import { promises as fsp, constants as fsConstants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { Errno, NbddError } from '../core/errors.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, alignedBuffer, fallocate } from '../sys/libc.js';

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

export class NodeFilePort implements FilePort {
  private closed = false;
  private zeroRangeWorks = true;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly readOnly: boolean,
  ) {}

  get fd(): number {
    return this.handle.fd;
  }

  /** `exclusive` (with `create`) fails with EEXIST when the file exists (O_EXCL). */
  static async open(
    path: string,
    options: { readOnly: boolean; direct?: boolean; create?: boolean; exclusive?: boolean },
  ): Promise<NodeFilePort> {
    let flags = options.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    if (options.create) flags |= fsConstants.O_CREAT;
    if (options.exclusive) flags |= fsConstants.O_EXCL;
    if (options.direct) flags |= fsConstants.O_DIRECT;
    const handle = await fsp.open(path, flags, 0o644);
    return new NodeFilePort(path, handle, options.readOnly);
  }

  async readAt(buf: Buffer, offset: number): Promise<Buffer> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.handle.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  async writeAt(buf: Buffer, offset: number): Promise<void> {
    this.assertWritable();
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.handle.write(buf, done, buf.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async writevAt(bufs: Buffer[], offset: number): Promise<void> {
    this.assertWritable();
    const total = bufs.reduce((n, b) => n + b.length, 0);
    const { bytesWritten } = await this.handle.writev(bufs, offset);
    if (bytesWritten < total) {
      // Rare short write: finish with one contiguous buffer.
      await this.writeAt(Buffer.concat(bufs).subarray(bytesWritten), offset + bytesWritten);
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

  async fsync(): Promise<void> {
    await this.handle.datasync();
  }

  async length(): Promise<number> {
    return (await this.handle.stat()).size;
  }

  async truncate(length: number): Promise<void> {
    this.assertWritable();
    await this.handle.truncate(length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  private assertWritable(): void {
    if (this.readOnly) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
  }
}
