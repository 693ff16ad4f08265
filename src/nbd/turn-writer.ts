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
 * Ownership: a buffer passed to `write` must not change until the socket has written it.
 */
import type { Socket } from 'node:net';

/** Buffers of at least this many bytes are written one at a time (see above). */
export const LARGE_WRITE = 128 * 1024;

interface Held {
  buf: Buffer;
  written?: (ok: boolean) => void;
}

export class TurnWriter {
  private corked = false;
  /** Writes waiting for the large buffer on the socket (null when none is). */
  private held: Held[] | null = null;
  private heldBytes = 0;

  constructor(private socket: Socket) {}

  /** Bytes written and not yet taken by the kernel: on the socket and waiting here. */
  get pendingBytes(): number {
    return this.socket.writableLength + this.heldBytes;
  }

  /** Writes go to `socket` from now on (a connection taken to TLS); the caller flushed first. */
  retarget(socket: Socket): void {
    this.flushNow();
    this.socket = socket;
  }

  /** `written`: called once the socket is done with `buf` (written, or failed: `ok` false). */
  write(buf: Buffer, written?: (ok: boolean) => void): void {
    if (this.held) {
      this.held.push({ buf, written });
      this.heldBytes += buf.length;
    } else this.send(buf, written);
  }

  /** Sends what this turn queued and every write waiting here now (before `end()`, for example). */
  flushNow(): void {
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
    for (const h of held) this.write(h.buf, h.written);
  }

  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };
}
