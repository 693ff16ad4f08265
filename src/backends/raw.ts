/**
 * The raw backend: a regular file or a block device served byte for byte (see raw.md).
 *
 * - Reads are one pread into a fresh buffer; writes one pwrite. Both go through the FilePort.
 * - FLUSH is fdatasync. FUA is left to the core (write, then a flush shared by every FUA write in
 *   flight): for a file, a native FUA could only be the same fdatasync per write.
 * - Block status of a file comes from SEEK_DATA/SEEK_HOLE: holes are `hole + zero` (depth 0),
 *   data is allocated (depth 1) and never claimed zero. A block device is all data.
 * - TRIM punches a hole in a file (PUNCH_HOLE | KEEP_SIZE) and discards on a block device
 *   (BLKDISCARD, trimmed inward to whole 4 KiB blocks). Both are advisory: where unsupported, TRIM
 *   does nothing.
 * - WRITE_ZEROES uses fallocate: ZERO_RANGE with NO_HOLE, PUNCH_HOLE (then ZERO_RANGE) without.
 *   Where the kernel refuses both, it writes zero bytes, unless `fastZero` asks for ENOTSUP.
 * - An advisory flock guards the image: LOCK_EX for a writer, LOCK_SH for a reader, never waiting;
 *   a conflict fails with EBUSY.
 * - With `direct`, the file is opened O_DIRECT: requests must be 4 KiB aligned (`minBlockSize`),
 *   reads land in page-aligned buffers and writes are copied into one.
 *
 * fallocate, lseek and BLKDISCARD are synchronous system calls on the event-loop thread; they are
 * metadata operations (quick), except a ZERO_RANGE on a block device without write-zeroes support,
 * where the kernel writes the zeroes itself.
 */
import { fstat } from 'node:fs';
import { promisify } from 'node:util';
import { allData, assertRange, defaultCaps, type Backend, type BackendCaps, type Extent, type ZeroOptions } from '../core/backend.js';
import { Errno, NbddError, assert, errnoOf, messageOf } from '../core/errors.js';
import { type FilePort } from '../io/file-port.js';
import type { Pipe } from '../io/pipes.js';
import { lockImage } from '../io/image-lock.js';
import { openFilePort } from '../io/open-port.js';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  SEEK_DATA,
  SEEK_HOLE,
  alignedBuffer,
  blockDeviceDiscard,
  blockDeviceSize,
  fallocate,
  seek,
} from '../sys/libc.js';
import { tryCall } from '../core/try-call.js';
import { QCOW2_MAGIC } from './qcow2/format/header.js';
import { requestBuffers } from '../core/request-buffers.js';

const fstatAsync = promisify(fstat);

/** Alignment of requests and buffers under O_DIRECT; also the discard granule of block devices. */
export const RAW_DIRECT_ALIGNMENT = 4096;

/** Most extents one block-status call returns; the client asks again for the rest. */
export const RAW_MAX_EXTENTS = 4096;

const PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE = FALLOC_FL_ZERO_RANGE;

export interface RawOpenOptions {
  readOnly?: boolean;
  /** Open with O_DIRECT (bypass the page cache). The size must be a multiple of 4 KiB. */
  direct?: boolean;
  /**
   * Create a new sparse file of this many bytes. Fails with EEXIST if the path exists, so an
   * existing image is never resized by accident.
   */
  create?: number;
  /**
   * The format was probed, not named: a write may then not give the first sector the qcow2 magic,
   * or the next probing open would take the guest's bytes for a qcow2 header — with a backing
   * file of the guest's choosing, any file of the host (qemu restricts block 0 the same way,
   * CVE-2008-2004).
   */
  probed?: boolean;
}

const MAGIC_LENGTH = 4;


export class RawBackend implements Backend {
  readonly kind = 'raw';
  readonly caps: BackendCaps;
  /** fallocate modes the filesystem or device refused with EOPNOTSUPP; not tried again. */
  private readonly unsupportedModes = new Set<number>();
  private discardWorks = true;
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly port: FilePort,
    readonly size: number,
    readonly isBlockDevice: boolean,
    readonly direct: boolean,
    private readonly probed: boolean,
  ) {
    const writable = !port.readOnly;
    this.caps = defaultCaps({
      readOnly: !writable,
      flush: writable,
      fua: false,
      trim: writable,
      writeZeroes: writable,
      fastZero: writable,
      blockStatus: true,
      multiConn: true,
      minBlockSize: direct ? RAW_DIRECT_ALIGNMENT : 1,
      preferredBlockSize: 4096,
    });
    const spliceTo = port.spliceTo;
    if (spliceTo) {
      this.spliceRead = (offset, length, into) =>
        tryCall(() => {
          assertRange(this.size, offset, length);
          return spliceTo(into.writeFd, offset, length);
        });
    }
    const spliceFrom = port.spliceFrom;
    if (spliceFrom && writable) {
      this.spliceWrite = (offset, length, from) =>
        tryCall(() => {
          this.assertWritable(offset, length);
          // The bytes a write puts at the start of a probed image are looked at first (firstSectorWrite).
          if (probed && offset < MAGIC_LENGTH) throw new NbddError(Errno.ENOTSUP, `${this.path}: the first sector of a probed image is checked before it is written`);
          return spliceFrom(from.readFd, offset, length);
        });
    }
  }

  /** Where the port splices (io_uring, no O_DIRECT): a file offset is one guest offset for good. */
  readonly spliceRead?: (offset: number, length: number, into: Pipe) => Promise<void>;
  readonly spliceWrite?: (offset: number, length: number, from: Pipe) => Promise<void>;

  get path(): string {
    return this.port.path;
  }

  /**
   * Opens (or with `create`, creates) a raw image and locks it. Throws NbddError: the open's errno
   * (ENOENT, EACCES, EEXIST, ...), EBUSY when another process holds a conflicting lock, EINVAL for
   * something that is neither a regular file nor a block device, a bad `create` size, or `direct`
   * with a size that is not a multiple of 4 KiB.
   */
  static async open(path: string, options: RawOpenOptions = {}): Promise<RawBackend> {
    const readOnly = !!options.readOnly;
    const direct = !!options.direct;
    const create = options.create;
    if (create !== undefined && (readOnly || !Number.isSafeInteger(create) || create <= 0)) {
      throw new NbddError(Errno.EINVAL, `cannot create ${path}: need a writable image of a whole number of bytes > 0`);
    }
    if (direct && create !== undefined && create % RAW_DIRECT_ALIGNMENT !== 0) {
      throw new NbddError(Errno.EINVAL, `cannot create ${path}: O_DIRECT needs a size that is a multiple of ${RAW_DIRECT_ALIGNMENT}`);
    }
    let port: FilePort;
    try {
      port = await openFilePort(path, { readOnly, direct, create: create !== undefined, exclusive: create !== undefined });
    } catch (err) {
      throw new NbddError(errnoOf(err), `cannot open raw image: ${messageOf(err)}`, { cause: err });
    }
    try {
      lockImage(port.fd, path, readOnly ? 'read' : 'write');
      if (create !== undefined) await port.truncate(create);
      const st = await fstatAsync(port.fd);
      if (!st.isFile() && !st.isBlockDevice()) {
        throw new NbddError(Errno.EINVAL, `${path} is neither a regular file nor a block device`);
      }
      const size = st.isBlockDevice() ? blockDeviceSize(port.fd) : st.size;
      if (direct && size % RAW_DIRECT_ALIGNMENT !== 0) {
        throw new NbddError(Errno.EINVAL, `${path}: O_DIRECT needs a size that is a multiple of ${RAW_DIRECT_ALIGNMENT} (it is ${size})`);
      }
      return new RawBackend(port, size, st.isBlockDevice(), direct, !!options.probed);
    } catch (err) {
      await port.close();
      throw err;
    }
  }

  /** A write reaching the first bytes of a probed image: refused if they would read as qcow2. */
  private async firstSectorWrite(offset: number, data: Buffer): Promise<void> {
    const head = Buffer.alloc(MAGIC_LENGTH);
    if (offset > 0 || data.length < MAGIC_LENGTH) await this.port.readAt(head, 0);
    data.copy(head, offset, 0, Math.min(data.length, MAGIC_LENGTH - offset));
    if (head.readUInt32BE(0) === QCOW2_MAGIC) {
      throw new NbddError(
        Errno.EPERM,
        `${this.path}: refusing to write a qcow2 header into the first sector of an image whose format was probed as raw (the next open would take it for qcow2); name the format with --format raw to allow it`,
      );
    }
    await this.writeAt(offset, data);
  }

  // read and write are on every request's path: plain functions returning the port's promise (an
  // async frame would add a promise and a microtask each); contract errors become rejections.

  /** Returns a new buffer owned by the caller (page-aligned under O_DIRECT). */
  read(offset: number, length: number): Promise<Buffer> {
    return tryCall(() => {
      assertRange(this.size, offset, length);
      const buf = this.direct ? alignedBuffer(length, RAW_DIRECT_ALIGNMENT) : requestBuffers.take(length);
      return this.port.readAt(buf, offset);
    });
  }

  /** Reads `data` until the promise settles (under O_DIRECT, only during this call). */
  write(offset: number, data: Buffer): Promise<void> {
    return tryCall(() => this.writeChecked(offset, data));
  }

  private writeChecked(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (this.probed && offset < MAGIC_LENGTH && data.length > 0) return this.firstSectorWrite(offset, data);
    return this.writeAt(offset, data);
  }

  private writeAt(offset: number, data: Buffer): Promise<void> {
    if (!this.direct) return this.port.writeAt(data, offset);
    const bounce = alignedBuffer(data.length, RAW_DIRECT_ALIGNMENT);
    data.copy(bounce);
    return this.port.writeAt(bounce, offset);
  }

  /** fdatasync: every write completed before the call is durable when it resolves. */
  async flush(): Promise<void> {
    return this.port.fsync();
  }

  async trim(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
    if (!this.isBlockDevice) {
      this.tryFallocate(PUNCH_HOLE, offset, length);
      return;
    }
    const start = Math.ceil(offset / RAW_DIRECT_ALIGNMENT) * RAW_DIRECT_ALIGNMENT;
    const end = Math.floor((offset + length) / RAW_DIRECT_ALIGNMENT) * RAW_DIRECT_ALIGNMENT;
    if (!this.discardWorks || end <= start) return;
    try {
      blockDeviceDiscard(this.port.fd, start, end - start);
    } catch (err) {
      if (errnoOf(err) !== Errno.ENOTSUP) throw err;
      this.discardWorks = false;
    }
  }

  /**
   * Fast paths first (see the file comment); then, unless `fastZero` (ENOTSUP), zero bytes are
   * written. Without `noHole` the range may end up deallocated.
   */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.assertWritable(offset, length);
    if (!options.noHole && this.tryFallocate(PUNCH_HOLE, offset, length)) return;
    if (this.tryFallocate(ZERO_RANGE, offset, length)) return;
    if (options.fastZero) throw new NbddError(Errno.ENOTSUP, `${this.path}: the kernel cannot zero this range quickly`);
    await this.port.zeroRange(offset, length);
  }

  /**
   * Consecutive extents from `offset`, ending at `offset + length` or after RAW_MAX_EXTENTS.
   * Data is never reported as zero; bytes past a file's current end read as zeroes, so a file
   * shorter than `size` ends in a hole.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    assertRange(this.size, offset, length);
    const end = offset + length;
    if (this.isBlockDevice) return [dataExtent(length)];
    const fd = this.port.fd;
    const extents: Extent[] = [];
    for (let at = offset; at < end && extents.length < RAW_MAX_EXTENTS; ) {
      const data = seek(fd, at, SEEK_DATA); // -1: no data at or after `at`
      if (data < 0 || data > at) {
        const holeEnd = data < 0 ? end : Math.min(data, end);
        extents.push({ length: holeEnd - at, hole: true, zero: true, depth: 0 });
        at = holeEnd;
        continue;
      }
      const hole = seek(fd, at, SEEK_HOLE);
      // A hole at `at` itself (or none) means the file changed under us: call it data to the end.
      const dataEnd = hole <= at ? end : Math.min(hole, end);
      extents.push(dataExtent(dataEnd - at));
      at = dataEnd;
    }
    return extents;
  }

  /** Flushes a writable image, then closes the file (dropping the lock). Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        if (!this.caps.readOnly) await this.port.fsync();
      } finally {
        await this.port.close();
      }
    })();
    return this.closing;
  }

  /* ------------------------------------------------------------ helpers */

  /**
   * fallocate(mode) over the range. False when the kernel refuses: EOPNOTSUPP (remembered, not
   * tried again) or EINVAL (e.g. a block device range not aligned to its sectors). Other errors
   * (EIO, ENOSPC, ...) are thrown.
   */
  private tryFallocate(mode: number, offset: number, length: number): boolean {
    if (this.unsupportedModes.has(mode)) return false;
    try {
      fallocate(this.port.fd, mode, offset, length);
      return true;
    } catch (err) {
      const errno = errnoOf(err);
      if (errno === Errno.ENOTSUP) this.unsupportedModes.add(mode);
      else if (errno !== Errno.EINVAL) throw err;
      return false;
    }
  }

  private assertWritable(offset: number, length: number): void {
    assert(!this.caps.readOnly, 'write-type request sent to a read-only raw image');
    assertRange(this.size, offset, length);
  }
}

function dataExtent(length: number): Extent {
  return allData(length)[0]!;
}

