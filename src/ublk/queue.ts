/**
 * One ublk hardware queue on the JavaScript side. Every request the queue reaped in one wakeup
 * arrives as one batch; each goes into the device's BlockQueue (so the BlockQueue's one dispatch
 * per turn sees them together), and its result goes back as a COMMIT_AND_FETCH. Two carriers
 * (native/ublk.c; docs/kernel.md, "Data path"):
 *
 *   loop    the event-loop thread owns the queue's io_uring: the ring's fd wakes the loop, a result
 *           is an SQE written at once (`ublkLoopCommit`), and everything written during a turn is
 *           submitted by one io_uring_enter just before the loop blocks again. No thread hop.
 *   thread  a pthread owns the ring and hands each wakeup's requests over in one threadsafe call;
 *           the results of one turn go back together (`turnEnd()`: one mutex push and one eventfd
 *           write), and the thread submits them on its next enter.
 *
 * Buffers: tag t's I/O buffer is `buffer[t*maxIo, t*maxIo + maxIo)`. WRITE payloads are views of
 * it, handed to the queue without a copy; READ data is copied into it before the result is
 * returned. A tag's buffer is ours from delivery until its result is given back (the Safety rules
 * in native/ublk.c); `finish` is the only place that gives it back.
 */
import { errnoOf, Errno } from '../core/errors.js';
import { logger } from '../core/log.js';
import type { BlockQueue } from '../core/queue.js';
import { requestBuffers } from '../core/request-buffers.js';
import { turnEnd } from '../core/batch.js';
import { QUEUE_EVENT, ublkAddon, type LoopQueueHandle, type QueueHandle } from './addon.js';
import { REC_WORDS, requestInBounds, SECTOR_SHIFT, UBLK_IO, UBLK_IO_F, UBLK_OP } from './uapi.js';

const log = logger('ublk');

/** Where a queue's io_uring lives: on the event-loop thread, or on a thread of its own. */
export type QueueMode = 'loop' | 'thread';

export interface QueueConfig {
  cdevFd: number;
  qid: number;
  depth: number;
  maxIo: number;
  queue: BlockQueue;
  readOnly: boolean;
  mode: QueueMode;
}

export class UblkQueue {
  private readonly buffer: Buffer;
  private readonly handle: QueueHandle | null = null;
  private readonly loop: LoopQueueHandle | null = null;
  /** thread mode: results waiting for the end of the turn, as (tag, result) pairs. */
  private readonly results: Uint32Array;
  private nresults = 0;
  private flushing = false;
  private inUser = 0;
  private readyResolve!: (ioFlusherErrno: number) => void;
  private readyReject!: (err: Error) => void;
  private exitResolve!: (code: number) => void;
  /** Resolves when every FETCH is queued (with PR_SET_IO_FLUSHER's errno on the queue's thread, 0 when set). */
  readonly ready = new Promise<number>((resolve, reject) => {
    this.readyResolve = resolve;
    this.readyReject = reject;
  });
  /** Resolves with the queue's exit code: 0 the device stopped, 1 stop(), < 0 -errno. */
  readonly exited = new Promise<number>((resolve) => (this.exitResolve = resolve));
  private exitedFlag = false;

  constructor(private readonly cfg: QueueConfig) {
    this.buffer = Buffer.allocUnsafeSlow(cfg.depth * cfg.maxIo);
    // `ready` is awaited by the frontend; an exit after that must not be an unhandled rejection.
    this.ready.catch(() => undefined);
    const addon = ublkAddon();
    if (cfg.mode === 'loop') {
      this.results = new Uint32Array(0);
      const records = new Uint32Array(cfg.depth * REC_WORDS);
      try {
        this.loop = addon.ublkLoopQueueStart(cfg.cdevFd, cfg.qid, cfg.depth, cfg.maxIo, this.buffer, UBLK_IO.FETCH_REQ, UBLK_IO.COMMIT_AND_FETCH_REQ, records, (kind, value) => {
          if (kind === QUEUE_EVENT.REQUESTS) this.deliver(records, value);
          else this.onExit(value);
        });
      } catch (err) {
        this.onExit(-errnoOf(err));
        return;
      }
      // The event-loop thread's PR_SET_IO_FLUSHER is set (and reported) by the attach command.
      this.readyResolve(0);
    } else {
      this.results = new Uint32Array(cfg.depth * 2);
      this.handle = addon.ublkQueueStart(cfg.cdevFd, cfg.qid, cfg.depth, cfg.maxIo, this.buffer, UBLK_IO.FETCH_REQ, UBLK_IO.COMMIT_AND_FETCH_REQ, (kind, code, extra, records) => {
        if (kind === QUEUE_EVENT.REQUESTS && records) this.deliver(records, records.length / REC_WORDS);
        else if (kind === QUEUE_EVENT.READY) {
          if (code < 0) this.readyReject(new Error(`ublk queue ${cfg.qid}: errno ${-code}`));
          else this.readyResolve(extra);
        } else if (kind === QUEUE_EVENT.EXITED) this.onExit(code);
      });
    }
  }

  /** Requests delivered and not yet answered. */
  get inFlight(): number {
    return this.inUser;
  }

  get hasExited(): boolean {
    return this.exitedFlag;
  }

  /** Stops serving: the queue's ring closes and the kernel cancels its commands. */
  stop(): void {
    if (this.loop) {
      if (this.exitedFlag) return;
      ublkAddon().ublkLoopStop(this.loop);
      this.onExit(1);
    } else if (this.handle) ublkAddon().ublkQueueStop(this.handle);
  }

  private onExit(code: number): void {
    if (this.exitedFlag) return;
    this.exitedFlag = true;
    if (code < 0) log.error(`ublk queue ${this.cfg.qid}: the queue failed (errno ${-code})`);
    this.readyReject(new Error(`ublk queue ${this.cfg.qid} exited before it was ready (errno ${-code})`));
    this.exitResolve(code);
  }

  /** The first `n` records of one wakeup, each (tag, op_flags, nr_sectors, sector lo, sector hi). */
  private deliver(records: Uint32Array, n: number): void {
    for (let i = 0; i < n * REC_WORDS; i += REC_WORDS) {
      this.handle1(records[i]!, records[i + 1]!, records[i + 2]!, records[i + 3]! + records[i + 4]! * 0x100000000);
    }
  }

  private handle1(tag: number, opFlags: number, sectors: number, sector: number): void {
    const { queue, maxIo } = this.cfg;
    const offset = sector * (1 << SECTOR_SHIFT);
    const length = sectors * (1 << SECTOR_SHIFT);
    const op = opFlags & 0xff;
    this.inUser++;
    if (!requestInBounds(op, offset, length, queue.size, maxIo)) {
      this.finish(tag, -Errno.EIO);
      return;
    }
    const fail = (err: unknown): void => this.finish(tag, -errnoOf(err));
    switch (op) {
      case UBLK_OP.READ:
        queue.read(offset, length).then((data) => {
          data.copy(this.buffer, tag * maxIo, 0, length);
          requestBuffers.give(data); // copied: the buffer may serve the next READ
          this.finish(tag, length);
        }, fail);
        return;
      case UBLK_OP.WRITE: {
        if (this.cfg.readOnly) return this.finish(tag, -Errno.EROFS);
        const start = tag * maxIo;
        queue.write(offset, this.buffer.subarray(start, start + length), { fua: (opFlags & UBLK_IO_F.FUA) !== 0 }).then(() => this.finish(tag, length), fail);
        return;
      }
      case UBLK_OP.FLUSH:
        queue.flush().then(() => this.finish(tag, 0), fail);
        return;
      case UBLK_OP.DISCARD:
        if (this.cfg.readOnly) return this.finish(tag, -Errno.EROFS);
        queue.trim(offset, length, { fua: (opFlags & UBLK_IO_F.FUA) !== 0 }).then(() => this.finish(tag, 0), fail);
        return;
      case UBLK_OP.WRITE_ZEROES:
        if (this.cfg.readOnly) return this.finish(tag, -Errno.EROFS);
        queue.writeZeroes(offset, length, { noHole: (opFlags & UBLK_IO_F.NOUNMAP) !== 0, fua: (opFlags & UBLK_IO_F.FUA) !== 0 }).then(() => this.finish(tag, 0), fail);
        return;
      default:
        this.finish(tag, -Errno.ENOTSUP);
    }
  }

  /** Gives the tag back with its result (bytes done, 0, or -errno). */
  private finish(tag: number, result: number): void {
    this.inUser--;
    if (this.loop) {
      // Written into the ring now, submitted with the rest of the turn's before the loop blocks.
      ublkAddon().ublkLoopCommit(this.loop, tag, result);
      return;
    }
    this.results[this.nresults * 2] = tag;
    this.results[this.nresults * 2 + 1] = result >>> 0;
    this.nresults++;
    if (!this.flushing) {
      this.flushing = true;
      void turnEnd().then(this.flushResults);
    }
  }

  private readonly flushResults = (): void => {
    this.flushing = false;
    const n = this.nresults;
    this.nresults = 0;
    if (n) ublkAddon().ublkComplete(this.handle!, this.results, n);
  };
}
