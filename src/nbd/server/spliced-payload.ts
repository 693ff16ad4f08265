/**
 * How WRITE payloads are received: into a buffer of their own from a size on (OWN_PAYLOAD_MIN),
 * and, from the kernel's sockets, large ones spliced into a pipe (docs/architecture.md, "Spliced
 * writes"), so that the daemon never copies them: the socket's pages go into the pipe by
 * reference, and the backend splices the pipe into the image file (`Backend.spliceWrite`), where
 * the kernel copies them into the page cache. Received the usual way, a payload is copied twice on
 * the way: out of the socket into our buffer, and from it into the page cache.
 *
 * While a payload is spliced the session's socket is paused (libuv reads nothing from it), so the
 * socket's next bytes are the payload's. The bytes already received with the WRITE's header go
 * into the pipe first (one small copy). Waits for more bytes are polls on the ring
 * (`UringEngine.waitReadable`), cancelled if the session ends meanwhile.
 *
 * A pipe holds a bounded number of pieces (slots), and a socket's bytes may come in pieces smaller
 * than a page. When the pipe is full before the payload is in (the socket has bytes, the splice
 * moves none), what it holds is read into a buffer, and the rest of the payload is read into that
 * buffer the usual way (`buffered`): never wrong, only slower.
 *
 * Only the kernel's sockets splice (`SessionOptions.splicePayloads`): its NBD driver sends a
 * request's pages in one stretch into a socket whose buffer we sized. A client's large sends
 * measured slower spliced (raw 1 MiB writes from fio's nbd engine: 2084 MiB/s against 2746, 434 µs
 * of CPU per request against 334; docs/performance.md): more splices and ring polls per payload
 * than the copy they save on a real CPU.
 */
import { writeSync } from 'node:fs';
import { Errno } from '../../core/errors.js';
import { POOL_MIN, requestBuffers } from '../../core/request-buffers.js';
import type { BlockQueue } from '../../core/queue.js';
import { sharedEngine } from '../../io/open-port.js';
import { pipes, readOut, type Pipe } from '../../io/pipes.js';
import type { SocketWait } from '../../io/uring-engine.js';
import { spliceStreams } from '../../sys/libc.js';

/**
 * WRITE payloads at least this long get a buffer of their own from the request-buffer pool, which
 * socket reads fill directly on slab sockets (`NbdSession.overSlab`) and input chunks are copied
 * into otherwise; shorter ones are views of the received bytes. A view would hold its slab until
 * the write completes, so the room of the read it came in could not be reused (`ReadSlab.reuse`):
 * 4 KiB writes used up a fresh 1 MiB slab every 250 requests, left to the GC.
 */
export const OWN_PAYLOAD_MIN = POOL_MIN;

/**
 * Shortest WRITE payload spliced. Below it the pipe's system calls (a splice in, a splice out, a
 * poll) cost more than the copy they save, as for spliced reads (SPLICE_READ_MIN).
 */
export const SPLICE_WRITE_MIN = 64 * 1024;

/** How a payload's reception ended. */
export type PayloadOutcome =
  /** All of it is in `pipe`, which the caller now owns. */
  | { kind: 'spliced'; pipe: Pipe }
  /** The pipe filled first: `filled` bytes are in `buf`, the rest is the socket's next bytes. */
  | { kind: 'buffered'; buf: Buffer; filled: number }
  /** The peer closed or failed mid-payload, or the session ended: nothing more will come. */
  | { kind: 'gone'; reason: string };

/** Frees what an outcome holds: its payload is not written. */
export function dropPayload(end: PayloadOutcome): void {
  if (end.kind === 'spliced') pipes.discard(end.pipe);
  else if (end.kind === 'buffered') requestBuffers.give(end.buf);
}

export class PayloadSplice {
  /** Settles once, with how the payload's reception ended. */
  readonly outcome: Promise<PayloadOutcome>;
  private settle!: (outcome: PayloadOutcome) => void;
  private filled = 0;
  private waiting: SocketWait | null = null;

  /**
   * Starts receiving a `length`-byte payload from the socket `fd` into a pipe where it can: a
   * payload at least SPLICE_WRITE_MIN long, a stack that writes from pipes, a ring that polls, a
   * pipe free. `head`: the payload's bytes already received (fewer than `length`), copied into the
   * pipe before this returns. `live`: false once the socket may no longer be used (its descriptor
   * may then name something else). Null: receive it the usual way.
   */
  static start(fd: number, length: number, q: BlockQueue, head: (into: (bytes: Buffer) => void) => void, live: () => boolean): PayloadSplice | null {
    if (fd < 0 || length < SPLICE_WRITE_MIN || !q.splicesWrites || !sharedEngine()?.canSplice) return null;
    const pipe = pipes.take(0, length);
    return pipe ? new PayloadSplice(fd, pipe, length, head, live) : null;
  }

  private constructor(
    private readonly fd: number,
    private readonly pipe: Pipe,
    private readonly length: number,
    head: (into: (bytes: Buffer) => void) => void,
    private readonly live: () => boolean,
  ) {
    this.outcome = new Promise((resolve) => (this.settle = resolve));
    head((bytes) => {
      for (let done = 0; done < bytes.length; ) done += writeSync(pipe.writeFd, bytes, done);
      this.filled += bytes.length;
    });
    this.pump(false);
  }

  /** Ends a wait for the socket's bytes (the session is ending); the outcome is then `gone`. */
  cancel(): void {
    this.waiting?.cancel();
  }

  /** Splices until the payload is in; `woken`: the socket was just reported readable. */
  private pump(woken: boolean): void {
    while (this.filled < this.length) {
      // Checked before every call: a destroyed socket's descriptor may already name another file.
      if (!this.live()) return this.gone('the session ended');
      const n = spliceStreams(this.fd, this.pipe.writeFd, this.length - this.filled);
      if (n > 0) {
        this.filled += n;
        woken = false;
        continue;
      }
      if (n === 0) return this.gone('the peer closed the connection mid-payload');
      if (n !== -Errno.EAGAIN) return this.gone(`splice from the socket failed (errno ${-n})`);
      if (woken) return this.buffered(); // the socket has bytes, the pipe took none: it is full
      const wait = sharedEngine()!.waitReadable(this.fd);
      this.waiting = wait;
      void wait.ready.then((ok) => {
        this.waiting = null;
        if (ok) this.pump(true);
        else if (this.live()) this.buffered(); // the ring is gone: libuv reads the rest
        else this.gone('the session ended');
      });
      return;
    }
    this.settle({ kind: 'spliced', pipe: this.pipe });
  }

  private buffered(): void {
    const buf = requestBuffers.take(this.length);
    readOut(this.pipe, buf.subarray(0, this.filled));
    pipes.give(this.pipe);
    this.settle({ kind: 'buffered', buf, filled: this.filled });
  }

  private gone(reason: string): void {
    pipes.discard(this.pipe);
    this.settle({ kind: 'gone', reason });
  }
}
