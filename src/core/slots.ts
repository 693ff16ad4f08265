/**
 * A counting limiter: at most `limit` operations run at once, the rest wait in arrival order. A
 * finished operation hands its slot straight to the oldest waiter, so waiters go in order and a
 * newcomer cannot overtake them.
 */
import { tryCall } from './try-call.js';

export class Slots {
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(private readonly limit: number) {}

  /** Operations running now (at most `limit`). */
  get active(): number {
    return this.running;
  }

  /** Runs `fn` once a slot is free (at once when one is: no promise or microtask more than `fn`'s). */
  run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.running < this.limit) {
      this.running++;
      return this.hold(fn);
    }
    return new Promise<void>((resolve) => this.waiting.push(resolve)).then(() => this.hold(fn));
  }

  /** Runs `fn` in the slot taken for it, and passes the slot on when it settles. */
  private hold<T>(fn: () => Promise<T>): Promise<T> {
    return tryCall(fn).then(
      (value) => {
        this.release();
        return value;
      },
      (err: unknown) => {
        this.release();
        throw err;
      },
    );
  }

  private release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.running--;
  }
}
