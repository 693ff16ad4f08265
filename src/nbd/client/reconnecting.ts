/**
 * One connection to a remote export that survives the network. When the connection goes away,
 * requests in flight and new ones wait (they do not fail) while a new connection is negotiated
 * in the background, with backoff from 100 ms to 5 s; then they are sent again on it (reads,
 * writes, zeroes, trims and block status are idempotent; a FLUSH sent again covers the writes sent
 * again before it). A request that has waited `delayMs` fails with EIO; the reconnecting goes on,
 * and requests are served again as soon as the server is back. `delayMs` 0 fails at once, and
 * still reconnects for later requests.
 *
 * A server that comes back with another export size is not the same disk: requests then fail
 * with EIO and nbdd stops trying.
 */
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import { tryCall } from '../../core/try-call.js';
import type { NbdClient } from './client.js';

const log = logger('nbd');

const FIRST_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5000;

export interface ReconnectOptions {
  /** How long a request may wait for the connection to come back before it fails (ms). */
  delayMs: number;
  /**
   * A request without a reply for this long (ms; 0: no limit) drops its connection, as the kernel's
   * nbd timeout does: the requests on it are sent again on a new one, within `delayMs`.
   */
  requestTimeoutMs?: number;
  /** Opens and negotiates a new connection, as the first one was. */
  connect: () => Promise<NbdClient>;
  /** The remote, for log lines. */
  peer: string;
  /** Told when the connection is lost and when it is back (sidecar events). */
  onEvent?: (type: RemoteEventType, data: Record<string, unknown>) => void;
}

export type RemoteEventType = 'remote-lost' | 'remote-reconnected';

export type RemoteState = 'connected' | 'reconnecting' | 'failed' | 'closed';

export class ReconnectingClient {
  private current: NbdClient | null;
  private state_: RemoteState = 'connected';
  private waiters: (() => void)[] = [];
  private backoff: NodeJS.Timeout | null = null;
  private lostAt = 0;
  private fatal: NbddError | null = null;
  /** Times the connection came back (for status and tests). */
  reconnects = 0;

  constructor(
    /** The first connection: its negotiated info is what every later one must match. */
    readonly first: NbdClient,
    private readonly options: ReconnectOptions,
  ) {
    this.current = first;
    this.watch(first);
  }

  get state(): RemoteState {
    return this.state_;
  }

  /** The connection in use, or the first one while there is none (for its negotiated info). */
  get client(): NbdClient {
    return this.current ?? this.first;
  }

  /** Runs `op` on the live connection, waiting for one and sending it again when the connection drops. */
  run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    // The common case, a live connection: `op`'s promise, plus a rejection handler (no async frame).
    const c = this.current;
    if (!c) return this.runAgain(op);
    return this.timed(c, op).then(undefined, (err: unknown) => {
      this.afterFailure(c, err);
      return this.runAgain(op);
    });
  }

  /**
   * Throws `err` unless it came from the connection `c` being lost (and the daemon reconnects);
   * else takes `c` out of use, so the request may be sent again.
   */
  private afterFailure(c: NbdClient, err: unknown): void {
    const lost = c.lost;
    if (!lost || this.state_ === 'closed') throw err;
    this.lose(c, lost);
    if (this.options.delayMs === 0) throw new NbddError(Errno.EIO, `${messageOf(lost)} (reconnecting)`, { cause: lost });
  }

  /** `run` without a live connection at hand: waits for one (up to the reconnect delay), then sends. */
  private async runAgain<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    let deadline: number | null = null;
    for (;;) {
      const c = this.current;
      if (!c) {
        if (this.fatal) throw this.fatal;
        if (this.state_ === 'closed') throw new NbddError(Errno.ESHUTDOWN, `the connection to ${this.options.peer} is closed`);
        if (this.options.delayMs === 0) throw new NbddError(Errno.EIO, `the connection to NBD server ${this.options.peer} is lost (reconnecting)`);
        deadline ??= Date.now() + this.options.delayMs;
        await this.waitForConnection(deadline);
        continue;
      }
      try {
        return await this.timed(c, op);
      } catch (err) {
        this.afterFailure(c, err);
      }
    }
  }

  private timed<T>(c: NbdClient, op: (c: NbdClient) => Promise<T>): Promise<T> {
    const limit = this.options.requestTimeoutMs ?? 0;
    const p = tryCall(() => op(c));
    if (limit <= 0) return p;
    const timer = setTimeout(() => {
      log.warn(`a request to ${this.options.peer} had no reply for ${limit / 1000} s: dropping the connection`);
      c.abort(new NbddError(Errno.ETIMEDOUT, `NBD server ${this.options.peer} did not answer within ${limit / 1000} s`));
    }, limit);
    return p.finally(() => clearTimeout(timer));
  }

  /** Stops reconnecting and closes the connection; waiting requests fail with ESHUTDOWN. */
  async close(): Promise<void> {
    if (this.state_ === 'closed') return;
    this.state_ = 'closed';
    if (this.backoff) clearTimeout(this.backoff);
    this.wake();
    await this.current?.close();
  }

  private watch(c: NbdClient): void {
    void c.whenLost.then((err) => this.lose(c, err));
  }

  private lose(c: NbdClient, err: NbddError): void {
    if (this.current !== c || this.state_ === 'closed') return;
    this.current = null;
    this.state_ = 'reconnecting';
    this.lostAt = Date.now();
    log.warn(`remote-lost: ${messageOf(err)}; reconnecting (requests wait up to ${this.options.delayMs / 1000} s)`);
    this.options.onEvent?.('remote-lost', { remote: this.options.peer, reason: messageOf(err) });
    this.attempt(FIRST_BACKOFF_MS);
  }

  private attempt(backoffMs: number): void {
    if (this.state_ !== 'reconnecting') return;
    this.options.connect().then(
      (c) => {
        if (this.state_ !== 'reconnecting') {
          void c.close();
          return;
        }
        if (c.size !== this.first.size) {
          this.fatal = new NbddError(Errno.EIO, `NBD server ${this.options.peer} came back with an export of ${c.size} bytes, not ${this.first.size}: not the same disk`);
          this.state_ = 'failed';
          log.error(this.fatal.message);
          void c.close();
          this.wake();
          return;
        }
        this.current = c;
        this.state_ = 'connected';
        this.reconnects++;
        this.watch(c);
        const seconds = (Date.now() - this.lostAt) / 1000;
        log.info(`remote-reconnected: ${this.options.peer} after ${seconds.toFixed(1)} s`);
        this.options.onEvent?.('remote-reconnected', { remote: this.options.peer, seconds });
        this.wake();
      },
      (err) => {
        log.debug(`reconnecting to ${this.options.peer}: ${messageOf(err)}; next try in ${backoffMs} ms`);
        this.backoff = setTimeout(() => {
          this.backoff = null;
          this.attempt(Math.min(backoffMs * 2, MAX_BACKOFF_MS));
        }, backoffMs);
      },
    );
  }

  /** Resolves when a connection is back (or the client closed or failed); rejects with EIO at `deadline`. */
  private waitForConnection(deadline: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.waiters = this.waiters.filter((w) => w !== done);
          reject(new NbddError(Errno.EIO, `NBD server ${this.options.peer} unreachable for ${this.options.delayMs / 1000} s (still reconnecting)`));
        },
        Math.max(0, deadline - Date.now()),
      );
      const done = (): void => {
        clearTimeout(timer);
        resolve();
      };
      this.waiters.push(done);
    });
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}
