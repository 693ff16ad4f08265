/**
 * A counting limiter: at most `limit` operations run at once, the rest wait in arrival order. A
 * finished operation hands its slot straight to the oldest waiter, so waiters go in order and a
 * newcomer cannot overtake them.
 */
export class Slots {
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(private readonly limit: number) {}

  /** Operations running now (at most `limit`). */
  get active(): number {
    return this.running;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.running < this.limit) this.running++;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.running--;
    }
  }
}
