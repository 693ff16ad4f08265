/**
 * The client's requests in flight, by cookie. A cookie names a slot of an array (`cookieLo`) and
 * the slot's generation (`cookieHi`, bumped each time the slot is reused), so a reply carrying
 * the cookie of a request that already completed is never taken for a later request in the same
 * slot. It replaces a Map from increasing cookies: a long-lived Map with an insertion and a
 * deletion per request made V8 rebuild its hash table every few requests in the old generation,
 * and the dead tables' references kept young request objects alive into the old generation too
 * (remote 4k reads grew the old generation by 80 MB between two full GCs).
 */
export class CookieTable<T> {
  private readonly entries: (T | undefined)[] = [];
  private readonly generations: number[] = [];
  /** Free slots, the most recently freed last (reused first). */
  private readonly free: number[] = [];
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** Stores `value` in a free slot and returns the slot (the cookie's low half). */
  add(value: T): number {
    let slot = this.free.pop();
    if (slot === undefined) {
      slot = this.entries.length;
      this.entries.push(value);
      this.generations.push(1);
    } else {
      this.entries[slot] = value;
      this.generations[slot] = (this.generations[slot]! + 1) >>> 0 || 1;
    }
    this.count++;
    return slot;
  }

  /** The cookie's high half for the value in `slot`. */
  generation(slot: number): number {
    return this.generations[slot]!;
  }

  /** The value whose cookie is (`hi`, `lo`), if it is still in flight. */
  get(hi: number, lo: number): T | undefined {
    return this.generations[lo] === hi ? this.entries[lo] : undefined;
  }

  /** Frees `slot`; returns what it held. */
  delete(slot: number): T | undefined {
    const value = this.entries[slot];
    if (value === undefined) return undefined;
    this.entries[slot] = undefined;
    this.free.push(slot);
    this.count--;
    return value;
  }

  /** Empties the table; returns what it held. */
  takeAll(): T[] {
    const all: T[] = [];
    for (let slot = 0; slot < this.entries.length; slot++) {
      const value = this.entries[slot];
      if (value !== undefined) {
        all.push(value);
        this.delete(slot);
      }
    }
    return all;
  }
}
