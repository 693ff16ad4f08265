/**
 * The memory one NBD server may hold for READ replies of its clients: the data of READs in flight
 * and of replies not yet taken by the kernel. A client that pipelines large READs and never reads
 * the replies otherwise costs the daemon all it asks for (issue: 4 such clients, 2.3 GiB).
 *
 * Two bounds: a session stops taking requests while it holds more than its own share (see
 * SessionOptions.maxPendingReplyBytes), and a large READ waits for room here when every client
 * together holds `limit`. Small READs (≤ SMALL_READ) never wait here, so a well-behaved client's
 * 4 KiB reads are answered whatever the others do; kernel sockets have no budget at all.
 */
export const DEFAULT_REPLY_BUDGET = 96 * 1024 * 1024;
/** READs up to this size are admitted even when the budget is spent (their cost is bounded by the connection cap). */
export const SMALL_READ = 128 * 1024;

export class ReplyBudget {
  private used = 0;
  private readonly waiters = new Set<() => void>();

  constructor(readonly limit = DEFAULT_REPLY_BUDGET) {}

  get held(): number {
    return this.used;
  }

  /** Takes `n` bytes if they fit (or are small, or nothing is held at all); false means wait. */
  tryTake(n: number): boolean {
    if (n > SMALL_READ && this.used > 0 && this.used + n > this.limit) return false;
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
