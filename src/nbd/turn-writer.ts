/**
 * Writes to a socket batched per callback: the first write corks the socket and a `nextTick`
 * uncorks it, which runs once the callback that wrote and every promise continuation it started
 * have run, so the replies of one batch of requests (or of one drain of I/O completions) leave in
 * one writev. Used by both ends of the NBD protocol (server sessions, the client stream).
 *
 * Not at `turnEnd` (src/core/batch.ts), as before: the queue issues a batch from a `setImmediate`,
 * and a `setImmediate` queued from there runs in the next loop iteration, so every reply to a
 * batch waited one iteration (a poll for I/O) before it left. Uncorked at once, 4 KiB random reads
 * at depth 16 on a raw image measured 132647 against 113938 IOPS, 7.9 against 9.1 µs of CPU each
 * (medians of four alternating rounds; docs/performance.md).
 *
 * Large buffers (LARGE_WRITE and up: READ data, WRITE payloads) go to the socket one at a time.
 * Node completes a writev as a whole: every buffer of it is held until its last byte is sent, and
 * what is written meanwhile joins the next writev on the same terms. At 1 MiB reads of depth 8
 * that held about twice the depth in buffers (14–15 of the request-buffer pool's 1 MiB ones out at
 * once), since a client answered early sends its next request while the rest of the batch is
 * still going out. So while a large buffer is on the socket, later writes wait here, in order, and
 * go on when it is written: each large buffer comes back as soon as its own bytes left.
 *
 * Spliced data (`writeSpliced`, src/io/pipes.ts) goes the same way as a large buffer: its header
 * through the socket, then, once the socket has written everything before it, the pipe's bytes
 * by splice(2) straight into the socket's descriptor, waiting for room on the io_uring (a poll)
 * when it is full; later writes wait here meanwhile. Only a writer given the socket's descriptor
 * (a plain socket, no TLS) can do this.
 *
 * Ownership: a buffer passed to `write` must not change until the socket has written it.
 */
import type { Socket } from 'node:net';
import { Errno } from '../core/errors.js';
import type { Pipe } from '../io/pipes.js';
import type { SocketWait } from '../io/uring-engine.js';
import { sharedEngine } from '../io/open-port.js';
import { spliceStreams } from '../sys/libc.js';

/** Buffers of at least this many bytes are written one at a time (see above). */
export const LARGE_WRITE = 128 * 1024;

interface Held {
  buf: Buffer;
  written?: (ok: boolean) => void;
  /** Bytes in a pipe that follow `buf` (see `writeSpliced`). */
  spliced?: SplicedData;
}

/** What `writeSpliced` sends after its header. */
export interface SplicedData {
  pipe: Pipe;
  length: number;
  /**
   * Called once: true when all `length` bytes are in the socket (the pipe is empty), false when
   * they cannot be (the socket failed or closed; the pipe holds an unknown part).
   */
  sent: (ok: boolean) => void;
}

export class TurnWriter {
  private corked = false;
  /** Writes waiting for the large buffer on the socket (null when none is). */
  private held: Held[] | null = null;
  private heldBytes = 0;
  /** Bytes of the pipe being spliced not yet in the socket (0 when none is). */
  private splicing = 0;
  /** The wait for room, while a splice waits for it. */
  private waiting: SocketWait | null = null;

  /** `spliceFd`: the socket's descriptor, where `writeSpliced` may be used (a plain socket). */
  constructor(
    private socket: Socket,
    private spliceFd = -1,
  ) {
    if (spliceFd >= 0) socket.once('close', () => this.waiting?.cancel());
  }

  /** Whether `writeSpliced` works here. */
  get splices(): boolean {
    return this.spliceFd >= 0;
  }

  /** The plain socket's descriptor where `splices` (a WRITE's payload may be spliced from it too), else -1. */
  get plainFd(): number {
    return this.spliceFd;
  }

  /** Bytes written and not yet taken by the kernel: on the socket and waiting here. */
  get pendingBytes(): number {
    return this.socket.writableLength + this.heldBytes + this.splicing;
  }

  /** Writes go to `socket` from now on (a connection taken to TLS); the caller flushed first. */
  retarget(socket: Socket): void {
    this.flushNow();
    this.socket = socket;
    this.spliceFd = -1; // TLS: bytes must go through the stream
  }

  /** `written`: called once the socket is done with `buf` (written, or failed: `ok` false). */
  write(buf: Buffer, written?: (ok: boolean) => void): void {
    if (this.held) {
      this.held.push({ buf, written });
      this.heldBytes += buf.length;
    } else this.send(buf, written);
  }

  /**
   * Sends `header`, then `data.length` bytes from `data.pipe`, before anything written after it.
   * Only where `splices`.
   */
  writeSpliced(header: Buffer, data: SplicedData): void {
    if (this.held) {
      this.held.push({ buf: header, spliced: data });
      this.heldBytes += header.length + data.length;
    } else this.sendSpliced(header, data);
  }

  /**
   * Sends what this turn queued and every write waiting here now (before `end()`, for example).
   * While a pipe is being spliced, what waits goes after it (the stream would interleave otherwise).
   */
  flushNow(): void {
    if (this.splicing > 0 || this.held?.some((h) => h.spliced)) {
      if (this.corked) this.uncork();
      return;
    }
    const held = this.held;
    this.held = null;
    this.heldBytes = 0;
    if (held) for (const h of held) this.toSocket(h.buf, h.written);
    if (this.corked) this.uncork();
  }

  private send(buf: Buffer, written?: (ok: boolean) => void): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    if (buf.length < LARGE_WRITE) return this.toSocket(buf, written);
    const held: Held[] = [];
    this.held = held;
    this.socket.write(buf, (err) => {
      written?.(!err);
      if (this.held === held) this.release();
    });
  }

  private sendSpliced(header: Buffer, data: SplicedData): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    const held: Held[] = [];
    this.held = held;
    this.splicing = data.length;
    // The header's callback runs once it and everything before it are in the kernel's socket.
    this.socket.write(header, (err) => (err ? this.spliced(held, data, false) : this.pumpSplice(held, data)));
  }

  /** Splices what is left of `data` into the socket; waits for room when it is full. */
  private pumpSplice(held: Held[], data: SplicedData): void {
    while (this.splicing > 0) {
      // Checked before every call: a destroyed socket's descriptor may already name another file.
      if (this.socket.destroyed) return this.spliced(held, data, false);
      const n = spliceStreams(data.pipe.readFd, this.spliceFd, this.splicing);
      if (n > 0) {
        this.splicing -= n;
        continue;
      }
      if (n !== -Errno.EAGAIN) return this.spliced(held, data, false);
      const wait = sharedEngine()!.waitWritable(this.spliceFd);
      this.waiting = wait;
      void wait.ready.then((room) => {
        this.waiting = null;
        if (room) this.pumpSplice(held, data);
        else this.spliced(held, data, false);
      });
      return;
    }
    this.spliced(held, data, true);
  }

  private spliced(held: Held[], data: SplicedData, ok: boolean): void {
    this.splicing = 0;
    // Half a reply leaves the stream unframed: nothing more can be sent on it.
    if (!ok) this.socket.destroy();
    data.sent(ok);
    if (this.held === held) this.release();
  }

  private toSocket(buf: Buffer, written?: (ok: boolean) => void): void {
    if (written) this.socket.write(buf, (err) => written(!err));
    else this.socket.write(buf);
  }

  /** The large buffer on the socket is written: the writes that waited go on, up to the next large one. */
  private release(): void {
    const held = this.held!;
    this.held = null;
    this.heldBytes = 0;
    // A large one among them holds the rest again (write queues behind it).
    for (const h of held) {
      if (h.spliced) this.writeSpliced(h.buf, h.spliced);
      else this.write(h.buf, h.written);
    }
  }

  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };
}
