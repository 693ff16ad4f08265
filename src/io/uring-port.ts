/**
 * FilePort on io_uring (the engine: src/io/uring-engine.ts; see docs/io-engine.md).
 */
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, spliceToPipe } from '../sys/libc.js';
import { NodeFilePort, RangeZeroer, readFully, type FilePiece, type FilePort, type InlineIo } from './file-port.js';
import { tryCall } from '../core/try-call.js';
import { HOW_DSYNC, HOW_OFFLOAD, type UringEngine } from './uring-engine.js';

/**
 * FilePort whose data path (read, write, writev, fdatasync, punch, zero) runs on a UringEngine.
 * Opening, length, truncate and close reuse NodeFilePort (slow path).
 *
 * Reads first try preadv2(RWF_NOWAIT) on the event-loop thread, as NodeFilePort does: a page-cache
 * hit then costs one system call and completes in the same turn (see docs/io-engine.md for the
 * measurement); a miss goes to the ring. On tmpfs, small reads are plain system calls on this
 * thread, and so are small buffered writes on local filesystems while they stay fast (see
 * InlineIo; the policy is the inner NodeFilePort's, decided once at open).
 */
export class UringFilePort implements FilePort {
  private pending = 0;
  private idle: (() => void) | null = null;
  private closing: Promise<void> | null = null;
  /** What runs on the event-loop thread (see InlineIo): the inner port's. */
  private readonly inline: InlineIo;
  /** `how` of writes: buffered ones go to the kernel's workers (IOSQE_ASYNC); O_DIRECT ones are issued inline. */
  private readonly writeHow: number;
  private readonly zeroer = new RangeZeroer(
    (offset, length) => this.trackMutation(this.engine.fallocate(this.fd, FALLOC_FL_ZERO_RANGE, offset, length), offset, length),
    (buf, offset) => this.writeAt(buf, offset),
  );

  /**
   * The file's length as this port's writes left it, and that length at the start of the last
   * fdatasync that returned (writeDurable's choice; a hint, not a guarantee of anything).
   */
  private end: number;
  private syncedEnd: number;

  private constructor(
    private readonly engine: UringEngine,
    private readonly inner: NodeFilePort,
    direct: boolean,
    length: number,
  ) {
    this.end = this.syncedEnd = length;
    this.inline = inner.inline;
    this.writeHow = direct ? 0 : HOW_OFFLOAD;
    if (!direct && engine.canSplice) {
      this.spliceTo = this.splicePages;
      this.spliceFrom = this.splicePagesIn;
    }
  }

  readonly spliceTo?: (pipeFd: number, offset: number, length: number) => Promise<void>;
  readonly spliceFrom?: (pipeFd: number, offset: number, length: number) => Promise<void>;

  /**
   * `spliceTo`: in memory filesystems a plain splice on this thread (as their reads are, see
   * InlineIo), elsewhere the ring's (a page-cache miss then waits in a kernel worker). Bytes past
   * the end of the file, or a pipe without room, reject: the caller reads the usual way instead.
   */
  private readonly splicePages = async (pipeFd: number, offset: number, length: number): Promise<void> => {
    let done = 0;
    while (done < length) {
      const n = this.inline.memory
        ? spliceToPipe(this.fd, offset + done, pipeFd, length - done)
        : await this.track(this.engine.splice(this.fd, offset + done, pipeFd, length - done));
      if (n <= 0) throw new NbddError(n < 0 ? -n : Errno.EIO, `splice at ${offset + done}: ${n < 0 ? nameOfErrno(-n) : 'end of file'}`);
      done += n;
    }
  };

  /**
   * `spliceFrom`: always the ring's splice, in a kernel worker, as large writes are (the copy into
   * the page cache is the work, and this thread has the sockets to serve meanwhile).
   */
  private readonly splicePagesIn = async (pipeFd: number, offset: number, length: number): Promise<void> => {
    this.assertWritable();
    this.grow(offset + length);
    let done = 0;
    while (done < length) {
      const n = await this.trackMutation(this.engine.spliceOut(pipeFd, this.fd, offset + done, length - done), offset + done, length - done);
      if (n <= 0) throw new NbddError(Errno.EIO, `splice into ${this.path} at ${offset + done}: the pipe ran dry`);
      done += n;
    }
  };

  /** Opens like NodeFilePort.open (same options and errors), then routes I/O through `engine`. */
  static async open(
    engine: UringEngine,
    path: string,
    options: { readOnly: boolean; direct?: boolean; create?: boolean; exclusive?: boolean },
  ): Promise<UringFilePort> {
    const inner = await NodeFilePort.open(path, options);
    try {
      return new UringFilePort(engine, inner, !!options.direct, await inner.length());
    } catch (err) {
      await inner.close();
      throw err;
    }
  }

  get path(): string {
    return this.inner.path;
  }
  get fd(): number {
    return this.inner.fd;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  readAt(buf: Buffer, offset: number): Promise<Buffer> {
    return readFully(this.fd, buf, offset, this.inline, (done) =>
      this.track(this.engine.read(this.fd, done === 0 ? buf : buf.subarray(done), offset + done)),
    );
  }

  writeAt(buf: Buffer, offset: number): Promise<void> {
    return tryCall(() => {
      this.assertWritable();
      this.grow(offset + buf.length);
      return this.inline.writes?.tryWrite(this.fd, buf, offset) ? undefined : this.writeRing(buf, offset);
    });
  }

  private async writeRing(buf: Buffer, offset: number, how = this.writeHow): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      done += await this.trackMutation(this.engine.write(this.fd, done === 0 ? buf : buf.subarray(done), offset + done, how), offset + done, buf.length - done);
    }
  }

  /**
   * One piece, in a file that has not grown since its last fdatasync: one RWF_DSYNC write, which
   * the kernel syncs alone. Otherwise the writes and one fdatasync, which measured faster
   * (`bench/scale.mjs`, bitmaps series, docs/performance.md): each RWF_DSYNC write flushes the
   * device's cache on its own, and in a file whose size changed the filesystem commits its
   * journal for it as well, while one fdatasync does both once for all.
   */
  async writeDurable(pieces: readonly FilePiece[]): Promise<void> {
    this.assertWritable();
    const [one] = pieces;
    if (pieces.length === 1 && this.end <= this.syncedEnd) {
      this.grow(one!.offset + one!.buf.length); // RWF_DSYNC makes a new size durable too
      return this.writeRing(one!.buf, one!.offset, this.writeHow | HOW_DSYNC);
    }
    await Promise.all(pieces.map((p) => this.writeAt(p.buf, p.offset)));
    await this.fsync();
  }

  async writevAt(bufs: Buffer[], offset: number): Promise<void> {
    this.assertWritable();
    const total = bufs.reduce((n, b) => n + b.length, 0);
    this.grow(offset + total);
    const written = await this.trackMutation(this.engine.writev(this.fd, bufs, offset, this.writeHow), offset, total);
    // Rare short write: finish with one contiguous buffer.
    if (written < total) await this.writeAt(Buffer.concat(bufs).subarray(written), offset + written);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    this.assertWritable();
    await this.trackMutation(this.engine.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length), offset, length);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.grow(offset + length);
    await this.zeroer.zero(offset, length);
  }

  async fsync(): Promise<void> {
    const end = this.end;
    await this.track(this.engine.fdatasync(this.fd));
    this.syncedEnd = Math.max(this.syncedEnd, end);
  }

  length(): Promise<number> {
    return this.inner.length();
  }

  truncate(length: number): Promise<void> {
    this.end = length;
    return this.track(this.inner.truncate(length)); // the inner port records it for InlineWrites
  }

  /** Waits for this port's operations still in flight (the kernel may be using the fd), then closes. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.pending > 0) await new Promise<void>((resolve) => (this.idle = resolve));
      await this.inner.close();
    })();
    return this.closing;
  }

  /** Counts `p` as in flight on this port until it settles. */
  private track<T>(p: Promise<T>): Promise<T> {
    this.pending++;
    const settle = (): void => {
      if (--this.pending === 0 && this.idle) this.idle();
    };
    p.then(settle, settle);
    return p;
  }

  /**
   * As `track`, for an operation that changes `length` bytes at `offset` (Infinity: to the end
   * and beyond): no inline write to that range overtakes it (see InlineWrites).
   */
  private trackMutation<T>(p: Promise<T>, offset: number, length: number): Promise<T> {
    const writes = this.inline.writes;
    return this.track(writes ? writes.track(p, offset, length) : p);
  }

  private assertWritable(): void {
    if (this.readOnly) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
  }

  private grow(end: number): void {
    if (end > this.end) this.end = end;
  }
}
