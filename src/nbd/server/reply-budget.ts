/**
 * The memory one NBD server may hold for large READ replies of its clients: the data of READs in
 * flight plus what waits in the client sockets unsent. A client that pipelines large READs and
 * never reads the replies otherwise costs the daemon all it asks for (issue: 4 such clients,
 * 2.3 GiB).
 *
 * Two bounds: a session stops taking requests while it holds more than its own share (see
 * SessionOptions.maxPendingReplyBytes), and a READ over SMALL_READ waits for room here when every
 * client together holds `limit`. Small READs are not counted (bounded per session by the queue
 * depth and the share), so a well-behaved client's 4 KiB reads are answered whatever the others
 * do, at no cost on their path; kernel sockets have no budget at all.
 */
export const DEFAULT_REPLY_BUDGET = 96 * 1024 * 1024;
/** READs up to this size are neither counted nor held back. */
export const SMALL_READ = 128 * 1024;

export class ReplyBudget {
  private used = 0;
  private readonly waiters = new Set<() => void>();

  /** `unsent`: bytes waiting in the client sockets now (the server sums them). */
  constructor(
    readonly limit = DEFAULT_REPLY_BUDGET,
    private readonly unsent: () => number = () => 0,
  ) {}

  /** Takes `n` bytes if they fit with what is held and unsent (or nothing is, at all); false means wait. */
  tryTake(n: number): boolean {
    const busy = this.used + this.unsent();
    if (busy > 0 && busy + n > this.limit) return false;
    this.used += n;
    return true;
  }

  give(n: number): void {
    this.used -= n;
    if (this.waiters.size === 0) return;
    const woken = [...this.waiters];
    this.waiters.clear();
    for (const w of woken) w();
  }

  /** Calls `wake` once, the next time bytes are given back. */
  whenFreed(wake: () => void): void {
    this.waiters.add(wake);
  }

  forget(wake: () => void): void {
    this.waiters.delete(wake);
  }
}

/**
 * One session's part of the budget: the large READ bytes it took and has in flight (sent ones
 * count in the session's `unsentBytes`). `hold` records a take and returns its release; `drop`
 * gives back everything at once when the session ends (its replies will never be read), after
 * which late releases do nothing.
 */
export class BudgetShare {
  /** Bytes taken and not given back. */
  held = 0;
  private dropped = false;
  /** The wait of `whenRoom`, while there is one. */
  private retry: (() => void) | null = null;
  private retryTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly budget: ReplyBudget,
    /** Called after a release (a session blocked on its own share may go on). */
    private readonly released: () => void,
  ) {}

  hold(n: number): () => void {
    this.held += n;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      if (this.dropped) return;
      this.held -= n;
      this.budget.give(n);
      this.released();
    };
  }

  /**
   * Calls `retry` once: when a READ gives bytes back, or after 50 ms (other clients' sockets
   * draining frees room too), whichever comes first. `drop` forgets it.
   */
  whenRoom(retry: () => void): void {
    this.retry = retry;
    this.budget.whenFreed(this.wake);
    this.retryTimer ??= setTimeout(this.wake, 50);
  }

  private readonly wake = (): void => {
    const retry = this.retry;
    this.forgetRetry();
    retry?.();
  };

  private forgetRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retry = null;
    this.budget.forget(this.wake);
  }

  drop(): void {
    this.forgetRetry();
    this.dropped = true;
    if (this.held > 0) this.budget.give(this.held);
    this.held = 0;
  }
}
