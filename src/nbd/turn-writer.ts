/**
 * Writes to a socket batched per event-loop turn: the first write of a turn corks the socket and
 * the turn's end (`turnEnd`, src/core/batch.ts) uncorks it, so everything queued in one turn
 * leaves in one writev. Used by both ends of the NBD protocol (server sessions, the client stream).
 *
 * Ownership: a buffer passed to `write` must not change until the socket has written it.
 */
import type { Socket } from 'node:net';
import { turnEnd } from '../core/batch.js';

export class TurnWriter {
  private corked = false;

  constructor(private socket: Socket) {}

  /** Writes go to `socket` from now on (a connection taken to TLS); the caller flushed first. */
  retarget(socket: Socket): void {
    this.flushNow();
    this.socket = socket;
  }

  /** `written`: called once the socket is done with `buf` (written, or failed: `ok` false). */
  write(buf: Buffer, written?: (ok: boolean) => void): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      void turnEnd().then(this.uncork);
    }
    if (written) this.socket.write(buf, (err) => written(!err));
    else this.socket.write(buf);
  }

  /** Sends what this turn queued now (before `end()`, for example). */
  flushNow(): void {
    if (this.corked) this.uncork();
  }

  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };
}
