/**
 * How one session's replies are framed and sent (simple or structured), and the two commands whose
 * replies are more than one frame: READ (plain, or sparse with OFFSET_HOLE chunks) and
 * BLOCK_STATUS (one chunk per negotiated meta context). The session decides when a request runs;
 * this decides what goes on the wire for it. Nothing is sent once the session has closed.
 */
import type { MetaContext } from '../../core/meta-context.js';
import { Errno, NbddError, errnoOf, messageOf } from '../../core/errors.js';
import type { BlockQueue } from '../../core/queue.js';
import { logger } from '../../core/log.js';
import { requestBuffers } from '../../core/request-buffers.js';
import { isAllZero } from '../../core/zeroes.js';
import { pipes, type Pipe } from '../../io/pipes.js';
import type { TurnWriter } from '../turn-writer.js';
import { LIMITS, NBD_CMD, NBD_CMD_FLAG, NBD_ERR, nameOfNbdCmd, nbdErrorFromErrno } from '../wire/constants.js';
import {
  encodeChunkBlockStatus,
  encodeChunkError,
  encodeChunkNone,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeSimpleReply,
  type RequestHeader,
} from '../wire/transmission.js';
import { clip, planSparseRead, readsSparsely } from './requests.js';

const log = logger('nbd');

/**
 * READs (and parts of sparse READs) of at least this many bytes are spliced where the session and
 * the stack can: below it, the pipe's system calls cost more than the copies they save.
 */
export const SPLICE_READ_MIN = 64 * 1024;

/** READ data in a pipe (`BlockQueue.spliceRead`). */
interface PipedData {
  pipe: Pipe;
  length: number;
}

export class ReplyWriter {
  /** Structured replies were negotiated. */
  structured = false;

  constructor(
    private readonly out: TurnWriter,
    private readonly isClosed: () => boolean,
    private readonly description: () => string,
  ) {}

  /**
   * Queues bytes on the socket. Writes made in one event-loop turn are corked together and leave
   * in one writev (the completion batch).
   */
  send(buf: Buffer): void {
    if (!this.isClosed()) this.out.write(buf);
  }

  ok(h: RequestHeader): void {
    this.send(encodeSimpleReply(0, h.cookieHi, h.cookieLo));
  }

  error(h: RequestHeader, error: number, message: string): void {
    if (this.isClosed()) return;
    log.debug(`${this.description()}: ${nameOfNbdCmd(h.type)} → error ${error}: ${message}`);
    if (this.structured && (h.type === NBD_CMD.READ || h.type === NBD_CMD.BLOCK_STATUS)) {
      this.send(encodeChunkError(h.cookieHi, h.cookieLo, true, error, message));
    } else {
      this.send(encodeSimpleReply(error, h.cookieHi, h.cookieLo));
    }
  }

  /** A failed request's reply; what is not a plain NbddError (or is an EIO) is logged too. */
  backendError(h: RequestHeader, err: unknown): void {
    const nbdError = nbdErrorFromErrno(errnoOf(err), h.flags);
    if (!(err instanceof NbddError) || nbdError === NBD_ERR.EIO) {
      log.warn(`${this.description()}: ${nameOfNbdCmd(h.type)} at ${h.offset}+${h.length} failed: ${messageOf(err)}`);
    }
    this.error(h, nbdError, messageOf(err));
  }

  /** `onSent`: called once this chunk is queued for the socket (where the session's `unsentBytes` counts it), or never will be. */
  readData(h: RequestHeader, offset: number, data: Buffer, done: boolean, onSent?: () => void): void {
    if (!this.isClosed()) {
      this.send(this.structured ? encodeChunkOffsetDataHeader(h.cookieHi, h.cookieLo, done, offset, data.length) : encodeSimpleReply(0, h.cookieHi, h.cookieLo));
      // Once written, the data's buffer may serve another READ (when it came from requestBuffers).
      if (data.length > 0) this.out.write(data, (ok) => ok && requestBuffers.give(data));
    }
    onSent?.();
  }

  /**
   * The reply to a whole READ answered by one queue read (`needsReadPlan` false). Over structured
   * replies, without DF, data that is all zeroes (an unallocated cluster, a hole in a raw file)
   * goes as one OFFSET_HOLE chunk: 32 bytes on the socket instead of 20 plus the data, as qemu-nbd
   * answers unallocated ranges. The test stops at the first non-zero chunk of data.
   */
  readReply(h: RequestHeader, data: Buffer, onSent?: () => void): void {
    if (this.structured && data.length > 0 && (h.flags & NBD_CMD_FLAG.DF) === 0 && isAllZero(data)) {
      this.send(encodeChunkOffsetHole(h.cookieHi, h.cookieLo, true, h.offset, data.length));
      requestBuffers.give(data);
      onSent?.();
      return;
    }
    this.readData(h, h.offset, data, true, onSent);
  }

  /** Whether a READ is answered by `read` below rather than one plain queue read. */
  needsReadPlan(h: RequestHeader, q: BlockQueue): boolean {
    return h.length === 0 || readsSparsely(h, this.structured, q.caps) || this.splices(h.length, q);
  }

  /**
   * Whether `length` bytes of READ data may go from a pipe (src/io/pipes.ts): enough of them to be
   * worth the pipe's system calls, a socket that takes splices, a stack that reads into pipes.
   */
  private splices(length: number, q: BlockQueue): boolean {
    return length >= SPLICE_READ_MIN && this.out.splices && q.splicesReads;
  }

  /** Answers a READ. `release`: called once the reply has left (or cannot). */
  async read(h: RequestHeader, q: BlockQueue, release?: () => void): Promise<void> {
    // Unspecified by the spec (SHOULD NOT disconnect): success with no data. A structured reply
    // cannot carry it as OFFSET_DATA (whose length MUST be at least 9), so NONE with DONE.
    if (h.length === 0) return this.structured ? this.send(encodeChunkNone(h.cookieHi, h.cookieLo)) : this.ok(h);
    // Sparse read: holes and zero extents become OFFSET_HOLE chunks, data is read per extent.
    const parts = readsSparsely(h, this.structured, q.caps)
      ? planSparseRead(await q.blockStatus(h.offset, h.length), h.offset, h.length)
      : [{ offset: h.offset, length: h.length, hole: false }];
    if (parts.length === 1 && !parts[0]!.hole && !this.splices(h.length, q)) {
      return this.readData(h, h.offset, await q.read(h.offset, h.length), true, release);
    }
    const data = await Promise.all(parts.map((p) => (p.hole ? null : this.readPart(q, p.offset, p.length))));
    if (this.isClosed()) {
      for (const d of data) if (d && !Buffer.isBuffer(d)) pipes.discard(d.pipe);
      return release?.();
    }
    const leaving: Promise<void>[] = [];
    parts.forEach((p, i) => {
      const done = i === parts.length - 1;
      const d = data[i];
      if (p.hole) this.send(encodeChunkOffsetHole(h.cookieHi, h.cookieLo, done, p.offset, p.length));
      else if (Buffer.isBuffer(d)) this.readData(h, p.offset, d, done);
      else leaving.push(this.splicedData(h, p.offset, d!, done));
    });
    if (leaving.length > 0) await Promise.all(leaving);
    release?.();
  }

  /** `length` bytes at `offset`: in a pipe where they may be and one is free, else in a buffer. */
  private readPart(q: BlockQueue, offset: number, length: number): Promise<Buffer | PipedData> {
    const pipe = this.splices(length, q) ? pipes.take(offset, length) : null;
    if (!pipe) return q.read(offset, length);
    return q.spliceRead(offset, length, pipe).then(
      () => ({ pipe, length }),
      // The backend could not fill it (a range that is not plain data, a file shorter than it
      // was, ...): the usual read gives the right bytes, or the error to answer with.
      (err: unknown) => {
        if (errnoOf(err) === Errno.ENOTSUP) pipes.give(pipe); // untouched
        else pipes.discard(pipe);
        return q.read(offset, length);
      },
    );
  }

  /**
   * One chunk of READ data from a pipe (a simple reply's data, or an OFFSET_DATA chunk): resolves
   * once it has left, or cannot (the session is then closing). The pipe goes back to the pool, or
   * is closed if it was not emptied.
   */
  private splicedData(h: RequestHeader, offset: number, d: PipedData, done: boolean): Promise<void> {
    const header = this.structured ? encodeChunkOffsetDataHeader(h.cookieHi, h.cookieLo, done, offset, d.length) : encodeSimpleReply(0, h.cookieHi, h.cookieLo);
    return new Promise((resolve) =>
      this.out.writeSpliced(header, {
        pipe: d.pipe,
        length: d.length,
        sent: (ok) => {
          if (ok) pipes.give(d.pipe);
          else pipes.discard(d.pipe);
          resolve();
        },
      }),
    );
  }

  /** Answers a BLOCK_STATUS: one chunk per context, the last one flagged DONE. */
  /** FLUSH, TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS, validated: the queue's call, then its reply. */
  command(h: RequestHeader, q: BlockQueue, contexts: MetaContext[]): Promise<void> {
    const fua = (h.flags & NBD_CMD_FLAG.FUA) !== 0;
    switch (h.type) {
      case NBD_CMD.FLUSH:
        return q.flush().then(() => this.ok(h));
      case NBD_CMD.TRIM:
        return q.trim(h.offset, h.length, { fua }).then(() => this.ok(h));
      case NBD_CMD.WRITE_ZEROES: {
        const flags = { fua, noHole: (h.flags & NBD_CMD_FLAG.NO_HOLE) !== 0, fastZero: (h.flags & NBD_CMD_FLAG.FAST_ZERO) !== 0 };
        return q.writeZeroes(h.offset, h.length, flags).then(() => this.ok(h));
      }
      case NBD_CMD.CACHE:
        return q.cache(h.offset, h.length).then(() => this.ok(h));
      default: // BLOCK_STATUS, the one left once validated
        return this.blockStatus(h, contexts);
    }
  }

  async blockStatus(h: RequestHeader, contexts: MetaContext[]): Promise<void> {
    const reqOne = (h.flags & NBD_CMD_FLAG.REQ_ONE) !== 0;
    const results = await Promise.all(contexts.map((c) => c.extents(h.offset, h.length)));
    if (this.isClosed()) return;
    results.forEach((extents, id) => {
      const flat: number[] = [];
      for (const e of clip(extents, h.length, reqOne ? 1 : LIMITS.maxExtents)) flat.push(e.length, e.flags);
      this.send(encodeChunkBlockStatus(h.cookieHi, h.cookieLo, id === results.length - 1, id, flat));
    });
  }
}
