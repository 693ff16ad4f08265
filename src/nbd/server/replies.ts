/**
 * How one session's replies are framed and sent (simple or structured), and the two commands whose
 * replies are more than one frame: READ (plain, or sparse with OFFSET_HOLE chunks) and
 * BLOCK_STATUS (one chunk per negotiated meta context). The session decides when a request runs;
 * this decides what goes on the wire for it. Nothing is sent once the session has closed.
 */
import type { MetaContext } from '../../core/meta-context.js';
import { NbddError, errnoOf, messageOf } from '../../core/errors.js';
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
   * The reply to a whole READ whose data the queue put in `pipe` (`BlockQueue.spliceRead`): the
   * header, then the pipe spliced into the socket. Resolves once the data has left or cannot
   * (the session is then closing); the pipe goes back to the pool, or is closed if not emptied.
   */
  splicedReply(h: RequestHeader, pipe: Pipe): Promise<void> {
    if (this.isClosed()) {
      pipes.discard(pipe);
      return Promise.resolve();
    }
    const header = this.structured ? encodeChunkOffsetDataHeader(h.cookieHi, h.cookieLo, true, h.offset, h.length) : encodeSimpleReply(0, h.cookieHi, h.cookieLo);
    return new Promise((resolve) =>
      this.out.writeSpliced(header, {
        pipe,
        length: h.length,
        sent: (ok) => {
          if (ok) pipes.give(pipe);
          else pipes.discard(pipe);
          resolve();
        },
      }),
    );
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
    return h.length === 0 || readsSparsely(h, this.structured, q.caps);
  }

  /** Answers a READ. `release`: called once the reply has left (or cannot). */
  async read(h: RequestHeader, q: BlockQueue, release?: () => void): Promise<void> {
    // Unspecified by the spec (SHOULD NOT disconnect): success with no data. A structured reply
    // cannot carry it as OFFSET_DATA (whose length MUST be at least 9), so NONE with DONE.
    if (h.length === 0) return this.structured ? this.send(encodeChunkNone(h.cookieHi, h.cookieLo)) : this.ok(h);
    if (!readsSparsely(h, this.structured, q.caps)) {
      return this.readData(h, h.offset, await q.read(h.offset, h.length), true, release);
    }
    // Sparse read: holes and zero extents become OFFSET_HOLE chunks, data is read per extent.
    const parts = planSparseRead(await q.blockStatus(h.offset, h.length), h.offset, h.length);
    if (parts.length === 1 && !parts[0]!.hole) {
      return this.readData(h, h.offset, await q.read(h.offset, h.length), true, release);
    }
    const buffers = await Promise.all(parts.map((p) => (p.hole ? null : q.read(p.offset, p.length))));
    if (this.isClosed()) return release?.();
    parts.forEach((p, i) => {
      const done = i === parts.length - 1;
      if (p.hole) this.send(encodeChunkOffsetHole(h.cookieHi, h.cookieLo, done, p.offset, p.length));
      else this.readData(h, p.offset, buffers[i]!, done);
    });
    release?.();
  }

  /** Answers a BLOCK_STATUS: one chunk per context, the last one flagged DONE. */
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
