/**
 * A FilePort that records every change it passes through, with a logical clock, so a test can
 * build the file as a power loss at any moment could have left it: the state made durable by
 * the last fdatasync that returned and by durable writes that completed, plus any subset of the
 * changes issued after that fdatasync was called (the page cache writes pages back in no
 * particular order).
 */
import type { FilePiece, FilePort } from '../../src/io/file-port.js';

export interface LoggedChange {
  issued: number;
  /** Clock at completion; Infinity while in flight. */
  done: number;
  offset: number;
  /** The bytes the range holds afterwards (zeroes for punch and zero-range). */
  data: Buffer;
  /** Durable once done (`writeDurable`), whatever the syncs. */
  durable?: true;
  /** A truncate to `offset` bytes (data empty). */
  truncate?: true;
}

export interface LoggedSync {
  called: number;
  returned: number;
}

export class RecordingPort implements FilePort {
  clock = 0;
  readonly changes: LoggedChange[] = [];
  readonly syncs: LoggedSync[] = [];

  constructor(private readonly inner: FilePort) {}

  get path(): string {
    return this.inner.path;
  }
  get fd(): number {
    return this.inner.fd;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /** Advances the clock; the test calls it to timestamp its own events (a flush returning). */
  tick(): number {
    return ++this.clock;
  }

  readAt(buf: Buffer, offset: number): Promise<Buffer> {
    return this.inner.readAt(buf, offset);
  }

  writeAt(buf: Buffer, offset: number): Promise<void> {
    return this.record(offset, Buffer.from(buf), () => this.inner.writeAt(buf, offset));
  }

  writevAt(bufs: Buffer[], offset: number): Promise<void> {
    return this.record(offset, Buffer.concat(bufs), () => this.inner.writevAt(bufs, offset));
  }

  /** Each piece is recorded as its own change, durable once it is done (RWF_DSYNC's contract). */
  async writeDurable(pieces: readonly FilePiece[]): Promise<void> {
    await Promise.all(pieces.map((p) => this.record(p.offset, Buffer.from(p.buf), () => this.inner.writeDurable([p]), undefined, true)));
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.record(offset, Buffer.alloc(length), () => this.inner.punchHole(offset, length));
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.record(offset, Buffer.alloc(length), () => this.inner.zeroRange(offset, length));
  }

  async fsync(): Promise<void> {
    const sync = { called: this.tick(), returned: Infinity };
    this.syncs.push(sync);
    await this.inner.fsync();
    sync.returned = this.tick();
  }

  length(): Promise<number> {
    return this.inner.length();
  }

  truncate(length: number): Promise<void> {
    return this.record(length, Buffer.alloc(0), () => this.inner.truncate(length), true);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  /**
   * The file as a power loss at clock `t` may leave it, starting from `base` (the file before
   * the port was opened): durable changes in completion order, then each other change issued by
   * `t` with probability 1/2, in issue order.
   */
  crashImage(base: Buffer, t: number, rnd: () => number): Buffer {
    const lastSync = Math.max(0, ...this.syncs.filter((s) => s.returned <= t).map((s) => s.called));
    const isDurable = (c: LoggedChange) => c.done < lastSync || (c.durable === true && c.done <= t);
    const durable = this.changes.filter(isDurable).sort((a, b) => a.done - b.done);
    const maybe = this.changes.filter((c) => c.issued <= t && !isDurable(c));
    let file = Buffer.from(base);
    for (const c of durable.concat(maybe.filter(() => rnd() < 0.5))) {
      const end = c.truncate ? c.offset : c.offset + c.data.length;
      if (end > file.length) file = Buffer.concat([file, Buffer.alloc(end - file.length)]);
      if (c.truncate) file = file.subarray(0, end);
      else c.data.copy(file, c.offset);
    }
    return file;
  }

  private async record(offset: number, data: Buffer, op: () => Promise<void>, truncate?: true, durable?: true): Promise<void> {
    const change: LoggedChange = { issued: this.tick(), done: Infinity, offset, data, ...(truncate ? { truncate } : {}), ...(durable ? { durable } : {}) };
    this.changes.push(change);
    try {
      await op();
    } catch (err) {
      this.changes.splice(this.changes.indexOf(change), 1);
      throw err;
    }
    change.done = this.tick();
  }
}
