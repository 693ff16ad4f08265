/**
 * One ublk hardware queue on the JavaScript side: the queue thread (native/ublk.c) delivers every
 * request it reaped in one wakeup as one batch; each goes into the device's BlockQueue (so the
 * BlockQueue's one dispatch per turn sees them together), and the results of one event-loop turn
 * go back to the thread as one batch (one eventfd write, one io_uring_enter of COMMIT_AND_FETCH).
 *
 * Buffers: tag t's I/O buffer is `buffer[t*maxIo, t*maxIo + maxIo)`. WRITE payloads are views of
 * it, handed to the queue without a copy; READ data is copied into it before the result is
 * returned. A tag's buffer is ours from delivery until its result is queued (the Safety rules in
 * native/ublk.c); `finish` is the only place that gives it back.
 */
import { errnoOf, Errno } from '../core/errors.js';
import { logger } from '../core/log.js';
import type { BlockQueue } from '../core/queue.js';
import { turnEnd } from '../core/batch.js';
import { QUEUE_EVENT, ublkAddon, type QueueHandle } from './addon.js';
import { REC_WORDS, requestInBounds, SECTOR_SHIFT, UBLK_IO, UBLK_IO_F, UBLK_OP } from './uapi.js';

const log = logger('ublk');

export interface QueueConfig {
  cdevFd: number;
  qid: number;
  depth: number;
  maxIo: number;
  queue: BlockQueue;
  readOnly: boolean;
}

export class UblkQueue {
  private readonly buffer: Buffer;
  private readonly handle: QueueHandle;
  /** Results waiting for the end of the turn: (tag, result) pairs. */
  private readonly results: Uint32Array;
  private nresults = 0;
  private flushing = false;
  private inUser = 0;
  private readyResolve!: (ioFlusherErrno: number) => void;
  private readyReject!: (err: Error) => void;
  private exitResolve!: (code: number) => void;
  /** Resolves when every FETCH is queued (with PR_SET_IO_FLUSHER's errno, 0 when set). */
  readonly ready = new Promise<number>((resolve, reject) => {
    this.readyResolve = resolve;
    this.readyReject = reject;
  });
  /** Resolves with the thread's exit code: 0 the device stopped, 1 stop(), < 0 -errno. */
  readonly exited = new Promise<number>((resolve) => (this.exitResolve = resolve));
  private exitedFlag = false;

  constructor(private readonly cfg: QueueConfig) {
    this.buffer = Buffer.allocUnsafeSlow(cfg.depth * cfg.maxIo);
    this.results = new Uint32Array(cfg.depth * 2);
    // `ready` is awaited by the frontend; an exit after that must not be an unhandled rejection.
    this.ready.catch(() => undefined);
    this.handle = ublkAddon().ublkQueueStart(
      cfg.cdevFd,
      cfg.qid,
      cfg.depth,
      cfg.maxIo,
      this.buffer,
      UBLK_IO.FETCH_REQ,
      UBLK_IO.COMMIT_AND_FETCH_REQ,
      (kind, code, extra, records) => this.onEvent(kind, code, extra, records),
    );
  }

  /** Requests delivered and not yet answered. */
  get inFlight(): number {
    return this.inUser;
  }

  get hasExited(): boolean {
    return this.exitedFlag;
  }

  /** Asks the thread to leave its loop; its ring closes and the kernel cancels its commands. */
  stop(): void {
    ublkAddon().ublkQueueStop(this.handle);
  }

  private onEvent(kind: number, code: number, extra: number, records: Uint32Array | null): void {
    if (kind === QUEUE_EVENT.REQUESTS && records) {
      for (let i = 0; i < records.length; i += REC_WORDS) {
        this.handle1(records[i]!, records[i + 1]!, records[i + 2]!, records[i + 3]! + records[i + 4]! * 0x100000000);
      }
    } else if (kind === QUEUE_EVENT.READY) {
      if (code < 0) this.readyReject(new Error(`ublk queue ${this.cfg.qid}: ${Errno.EIO === -code ? 'I/O error' : `errno ${-code}`}`));
      else this.readyResolve(extra);
    } else if (kind === QUEUE_EVENT.EXITED) {
      this.exitedFlag = true;
      if (code < 0) log.error(`ublk queue ${this.cfg.qid}: the queue thread failed (errno ${-code})`);
      this.readyReject(new Error(`ublk queue ${this.cfg.qid} exited before it was ready (errno ${-code})`));
      this.exitResolve(code);
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

  /** Queues a result; the turn's results go to the thread together. */
  private finish(tag: number, result: number): void {
    this.inUser--;
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
    if (n) ublkAddon().ublkComplete(this.handle, this.results, n);
  };
}
