/**
 * Shared/exclusive locks over ranges of guest clusters, granted in arrival order.
 *
 * A request waits for every earlier holder or waiter whose range overlaps its own unless both are
 * shared. Because each request only waits on earlier ones, there is no deadlock, and a later
 * writer never overtakes an earlier reader of the same cluster (which is what keeps a read from
 * seeing a freed and reused host cluster). The list stays short: it holds the requests in flight.
 */
interface Holder {
  first: number;
  last: number;
  exclusive: boolean;
  /** Made when a later request first waits for this one (most never wait: no promise for them). */
  released: Promise<void> | null;
  release: (() => void) | null;
}

export class RangeLock {
  private holders: Holder[] = [];

  /**
   * Grants `[first, last]` (inclusive cluster indices): the release function itself when nothing
   * is in the way (the common case, on every request's path: no promise), else a promise of it.
   */
  take(first: number, last: number, exclusive: boolean): (() => void) | Promise<() => void> {
    let waits: Promise<void>[] | null = null;
    for (const h of this.holders) {
      if (h.first <= last && first <= h.last && (exclusive || h.exclusive)) {
        h.released ??= new Promise<void>((resolve) => (h.release = resolve));
        (waits ??= []).push(h.released);
      }
    }
    const holder: Holder = { first, last, exclusive, released: null, release: null };
    this.holders.push(holder);
    const unlock = (): void => {
      const i = this.holders.indexOf(holder);
      if (i >= 0) this.holders.splice(i, 1);
      holder.release?.();
    };
    if (!waits) return unlock;
    return (waits.length === 1 ? waits[0]! : Promise.all(waits)).then(() => unlock);
  }
}
