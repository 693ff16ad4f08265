/**
 * NBD client, transmission phase: the pure side. `PendingReply` gathers the reply of one request
 * (READ data reassembled from OFFSET_DATA / OFFSET_HOLE chunks, block-status extents per context,
 * the first error); `ReplyParser` is an incremental state machine over a `ChunkReader` that feeds
 * replies to their requests. No sockets here: `client.ts` pushes bytes in and settles promises.
 *
 * Every length from the wire is bounded against the request it answers (or a named limit) before a
 * byte of its payload is buffered; READ data is copied straight from the receive chunks into the
 * caller's buffer. Anything that loses framing or breaks the protocol throws `ProtocolError`; the
 * caller must then drop the connection.
 */
import { Errno, NbddError } from '../../core/errors.js';
import {
  LIMITS,
  NBD_CMD,
  NBD_ERR,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  errnoFromNbdError,
  nameOfNbdCmd,
  nameOfNbdReplyType,
} from '../wire/constants.js';
import { ProtocolError } from '../wire/handshake.js';
import type { ChunkReader } from '../wire/reader.js';
import {
  CHUNK_HEADER_LENGTH,
  OFFSET_DATA_PREFIX_LENGTH,
  decodeChunkPayload,
  type DecodedChunk,
  decodeOffsetDataPrefix,
  decodeReplyHeader,
  replyHeaderLength,
  type ReplyHeader,
} from '../wire/transmission.js';

/** Longest error-chunk payload: u32 error, u16 message length, 65535 bytes, u64 offset. */
const MAX_ERROR_CHUNK = 4 + 2 + 0xffff + 8;
/** Longest BLOCK_STATUS payload: u32 context id + LIMITS.maxExtents × (u32 length, u32 flags). */
const MAX_BLOCK_STATUS_CHUNK = 4 + 8 * LIMITS.maxExtents;
/** Longest payload of an unknown error-type chunk we skip over. */
const MAX_UNKNOWN_CHUNK = LIMITS.maxOptionLength;
/** OFFSET_HOLE payload: u64 offset, u32 size. */
const OFFSET_HOLE_LENGTH = 12;

/** Raw status extents of one context, flat: [length0, flags0, length1, flags1, ...]. */
export type FlatExtents = number[];

/**
 * The reply of one request while it arrives.
 *
 * Ownership: `data` (READ only) is the caller's destination buffer, filled in place; zeroes are
 * written for holes. It belongs to the caller once the reply is done.
 */
const NO_STATUS: ReadonlyMap<number, FlatExtents> = new Map();

export class PendingReply {
  /** Covered ranges of a READ, relative to `offset`, sorted, disjoint, merged when adjacent. */
  private readonly ranges: Array<[start: number, end: number]> = [];
  private coveredBytes = 0;
  private firstError: { errno: number; message: string } | null = null;
  /** BLOCK_STATUS extents by context id; made by the first such chunk (READs and WRITEs have none). */
  private statusByContext: Map<number, FlatExtents> | null = null;

  constructor(
    readonly type: number,
    readonly offset: number,
    readonly length: number,
    readonly cookieHi: number,
    readonly cookieLo: number,
    readonly data: Buffer | null = null,
  ) {}

  get description(): string {
    return `${nameOfNbdCmd(this.type)} ${this.offset}+${this.length}`;
  }

  /** BLOCK_STATUS extents by context id. */
  get status(): ReadonlyMap<number, FlatExtents> {
    return this.statusByContext ?? NO_STATUS;
  }

  /**
   * Claims `[offset, offset + length)` of a READ for one content chunk and returns where it starts
   * in `data`. Throws ProtocolError when the range lies outside the request or overlaps one
   * already received (both forbidden by the spec).
   */
  claim(offset: number, length: number): number {
    const start = offset - this.offset;
    const end = start + length;
    if (this.type !== NBD_CMD.READ || !this.data) throw new ProtocolError(`content chunk for ${this.description}`);
    if (length === 0 || start < 0 || end > this.length) {
      throw new ProtocolError(`READ chunk ${offset}+${length} outside the request ${this.offset}+${this.length}`);
    }
    const r = this.ranges;
    let lo = 0;
    let hi = r.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (r[mid]![0] < start) lo = mid + 1;
      else hi = mid;
    }
    const prev = r[lo - 1];
    const next = r[lo];
    if ((prev && prev[1] > start) || (next && next[0] < end)) {
      throw new ProtocolError(`READ chunk ${offset}+${length} overlaps another chunk of ${this.description}`);
    }
    if (prev && prev[1] === start) {
      prev[1] = end;
      if (next && next[0] === end) {
        prev[1] = next[1];
        r.splice(lo, 1);
      }
    } else if (next && next[0] === end) next[0] = start;
    else r.splice(lo, 0, [start, end]);
    this.coveredBytes += length;
    return start;
  }

  /** Records an error reply (simple reply error or ERROR chunk); the first one wins. */
  fail(nbdError: number, message: string): void {
    if (nbdError === 0) throw new ProtocolError(`error reply with error value 0 for ${this.description}`);
    this.firstError ??= { errno: errnoFromNbdError(nbdError), message };
  }

  /** Records one BLOCK_STATUS chunk; a second chunk for the same context breaks the protocol. */
  addStatus(contextId: number, extents: FlatExtents): void {
    if (this.type !== NBD_CMD.BLOCK_STATUS) throw new ProtocolError(`BLOCK_STATUS chunk for ${this.description}`);
    const status = (this.statusByContext ??= new Map());
    if (status.has(contextId)) throw new ProtocolError(`two BLOCK_STATUS chunks for context ${contextId}`);
    for (let i = 0; i < extents.length; i += 2) {
      if (extents[i] === 0) throw new ProtocolError('BLOCK_STATUS extent of length 0');
    }
    status.set(contextId, extents);
  }

  /**
   * After the last chunk: throws the server's error as NbddError (its errno), or EPROTO when a
   * successful READ did not cover the whole request. Block-status completeness is the caller's
   * check (it knows which contexts it selected).
   */
  check(): void {
    if (this.firstError) {
      const msg = this.firstError.message ? `: ${this.firstError.message}` : '';
      throw new NbddError(this.firstError.errno, `NBD server refused ${this.description}${msg}`);
    }
    if (this.type === NBD_CMD.READ && this.coveredBytes !== this.length) {
      throw new NbddError(Errno.EPROTO, `NBD server's reply to ${this.description} covered only ${this.coveredBytes} bytes`);
    }
  }
}

/** Where the parser finds requests by cookie and hands back finished ones. */
export interface ReplyTarget {
  /** The request in flight with this cookie, or undefined (a protocol error). */
  lookup(cookieHi: number, cookieLo: number): PendingReply | undefined;
  /** The last reply of `reply` arrived (call `reply.check()` for the outcome). */
  done(reply: PendingReply): void;
}

type Wait =
  | { kind: 'magic' }
  | { kind: 'header'; length: number }
  /** READ data straight into `reply.data`: after a simple reply, or in an OFFSET_DATA chunk. */
  | { kind: 'data'; reply: PendingReply; at: number; remaining: number; done: boolean }
  | { kind: 'dataOffset'; reply: PendingReply; dataLength: number; done: boolean }
  | { kind: 'payload'; reply: PendingReply; header: ChunkHeader }
  | { kind: 'skip'; reply: PendingReply; remaining: number; done: boolean };

type ChunkHeader = Extract<ReplyHeader, { kind: 'chunk' }>;

/**
 * Incremental reply parser. `pump(reader)` consumes every complete piece of the buffered bytes and
 * returns when it needs more; it may be called with any split of the stream.
 */
export class ReplyParser {
  private wait: Wait = { kind: 'magic' };
  /** Reused for every reply header (simple replies are 16 bytes, chunk headers 20). */
  private readonly header = Buffer.alloc(CHUNK_HEADER_LENGTH);

  constructor(private readonly target: ReplyTarget) {}

  /** True between replies (no partial reply buffered). */
  get idle(): boolean {
    return this.wait.kind === 'magic';
  }

  /**
   * Where the socket may put READ data directly: the rest of the data being received, when
   * nothing is buffered (`r` is empty) and at least `min` bytes of it are due; else null.
   */
  directTarget(r: ChunkReader, min: number): Buffer | null {
    const w = this.wait;
    if (w.kind !== 'data' || r.length > 0 || w.remaining < min) return null;
    return w.reply.data!.subarray(w.at, w.at + w.remaining);
  }

  /** `n` bytes landed at the start of the last `directTarget`. */
  directFilled(n: number): void {
    const w = this.wait as Extract<Wait, { kind: 'data' }>;
    w.at += n;
    w.remaining -= n;
    if (w.remaining === 0) this.endChunk(w.reply, w.done);
  }

  /** Throws ProtocolError on anything that breaks framing or the protocol. */
  pump(r: ChunkReader): void {
    while (this.step(r));
  }

  private step(r: ChunkReader): boolean {
    const w = this.wait;
    switch (w.kind) {
      case 'magic':
        if (r.length < 4) return false;
        r.consumeInto(this.header, 0, 4);
        this.wait = { kind: 'header', length: replyHeaderLength(this.header.readUInt32BE(0)) };
        return true;
      case 'header':
        if (r.length < w.length - 4) return false;
        r.consumeInto(this.header, 4, w.length - 4);
        this.handleHeader(decodeReplyHeader(this.header));
        return true;
      case 'data': {
        const n = r.consumeInto(w.reply.data!, w.at, w.remaining);
        w.at += n;
        w.remaining -= n;
        if (w.remaining > 0) return false;
        this.endChunk(w.reply, w.done);
        return true;
      }
      case 'dataOffset': {
        if (r.length < OFFSET_DATA_PREFIX_LENGTH) return false;
        const offset = r.decode(OFFSET_DATA_PREFIX_LENGTH, decodeOffsetDataPrefix);
        const at = w.reply.claim(offset, w.dataLength);
        this.wait = { kind: 'data', reply: w.reply, at, remaining: w.dataLength, done: w.done };
        return true;
      }
      case 'payload': {
        if (r.length < w.header.length) return false;
        // Decoded on the spot (what it yields copies the bytes): no view of the socket's read
        // buffer is kept, so its room is reused (ReadSlab.deliver). One block-status chunk per
        // READ otherwise cost a fresh 1 MiB slab every fifty replies.
        const chunk = r.decode(w.header.length, (payload) => decodeChunkPayload(w.header.type, payload));
        this.handleChunk(w.reply, w.header, chunk);
        return true;
      }
      case 'skip':
        w.remaining -= r.skip(w.remaining);
        if (w.remaining > 0) return false;
        this.endChunk(w.reply, w.done);
        return true;
    }
  }

  private find(h: ReplyHeader): PendingReply {
    const reply = this.target.lookup(h.cookieHi, h.cookieLo);
    if (!reply) throw new ProtocolError(`reply for unknown cookie 0x${h.cookieHi.toString(16)}${h.cookieLo.toString(16).padStart(8, '0')}`);
    return reply;
  }

  private handleHeader(h: ReplyHeader): void {
    const reply = this.find(h);
    if (h.kind === 'simple') {
      if (h.error !== 0) {
        reply.fail(h.error, '');
        return this.endChunk(reply, true);
      }
      if (reply.type === NBD_CMD.READ && reply.length > 0) {
        reply.claim(reply.offset, reply.length);
        this.wait = { kind: 'data', reply, at: 0, remaining: reply.length, done: true };
        return;
      }
      return this.endChunk(reply, true);
    }
    this.handleChunkHeader(reply, h);
  }

  /** Bounds the chunk's length by its type and request before anything of it is buffered. */
  private handleChunkHeader(reply: PendingReply, h: ChunkHeader): void {
    const done = (h.flags & NBD_REPLY_FLAG_DONE) !== 0;
    const bad = (why: string): ProtocolError =>
      new ProtocolError(`${nameOfNbdReplyType(h.type)} chunk of ${h.length} bytes for ${reply.description}: ${why}`);
    const isRead = reply.type === NBD_CMD.READ;
    switch (h.type) {
      case NBD_REPLY_TYPE.NONE:
        if (h.length !== 0) throw bad('must be empty');
        if (!done) throw bad('must carry the DONE flag');
        return this.endChunk(reply, true);
      case NBD_REPLY_TYPE.OFFSET_DATA:
        if (!isRead) throw bad('only READ gets data');
        if (h.length <= OFFSET_DATA_PREFIX_LENGTH || h.length - OFFSET_DATA_PREFIX_LENGTH > reply.length) throw bad('length out of range');
        this.wait = { kind: 'dataOffset', reply, dataLength: h.length - OFFSET_DATA_PREFIX_LENGTH, done };
        return;
      case NBD_REPLY_TYPE.OFFSET_HOLE:
        if (!isRead) throw bad('only READ gets holes');
        if (h.length !== OFFSET_HOLE_LENGTH) throw bad(`must be ${OFFSET_HOLE_LENGTH} bytes`);
        break;
      case NBD_REPLY_TYPE.BLOCK_STATUS:
        if (reply.type !== NBD_CMD.BLOCK_STATUS) throw bad('only BLOCK_STATUS gets extents');
        if (h.length > MAX_BLOCK_STATUS_CHUNK) throw bad(`more than ${LIMITS.maxExtents} extents`);
        break;
      case NBD_REPLY_TYPE.ERROR:
      case NBD_REPLY_TYPE.ERROR_OFFSET:
        if (h.length > MAX_ERROR_CHUNK) throw bad('too long');
        break;
      default:
        // An unknown type with bit 15 set is an error for this request only; others lose us.
        if ((h.type & 0x8000) === 0) throw bad('unknown non-error chunk type');
        if (h.length > MAX_UNKNOWN_CHUNK) throw bad('too long');
        reply.fail(NBD_ERR.EINVAL, `unknown error chunk type ${h.type}`);
        this.wait = { kind: 'skip', reply, remaining: h.length, done };
        return;
    }
    this.wait = { kind: 'payload', reply, header: h };
  }

  private handleChunk(reply: PendingReply, h: ChunkHeader, c: DecodedChunk): void {
    switch (c.type) {
      case NBD_REPLY_TYPE.OFFSET_HOLE: {
        const at = reply.claim(c.offset, c.size);
        reply.data!.fill(0, at, at + c.size);
        break;
      }
      case NBD_REPLY_TYPE.BLOCK_STATUS:
        reply.addStatus(c.contextId, c.extents);
        break;
      case NBD_REPLY_TYPE.ERROR:
        reply.fail(c.error, c.message);
        break;
      default:
        throw new ProtocolError(`unexpected ${nameOfNbdReplyType(h.type)} payload`);
    }
    this.endChunk(reply, (h.flags & NBD_REPLY_FLAG_DONE) !== 0);
  }

  private endChunk(reply: PendingReply, done: boolean): void {
    this.wait = { kind: 'magic' };
    if (done) this.target.done(reply);
  }
}
