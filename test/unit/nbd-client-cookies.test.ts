import { describe, expect, it } from 'vitest';
import { CookieTable } from '../../src/nbd/client/cookies.js';

describe('CookieTable', () => {
  it('finds a value by its slot and generation, and forgets it once deleted', () => {
    const t = new CookieTable<string>();
    const a = t.add('a');
    const b = t.add('b');
    expect(a).not.toBe(b);
    expect(t.size).toBe(2);
    expect(t.get(t.generation(a), a)).toBe('a');
    expect(t.get(t.generation(a) + 1, a)).toBeUndefined();
    expect(t.get(1, 99)).toBeUndefined();
    expect(t.delete(a)).toBe('a');
    expect(t.delete(a)).toBeUndefined();
    expect(t.size).toBe(1);
  });

  it('never answers a stale cookie for a reused slot', () => {
    const t = new CookieTable<string>();
    const slot = t.add('first');
    const stale = t.generation(slot);
    t.delete(slot);
    expect(t.add('second')).toBe(slot); // reused first
    expect(t.get(stale, slot)).toBeUndefined();
    expect(t.get(t.generation(slot), slot)).toBe('second');
  });

  it('hands out distinct cookies for everything in flight, and gives everything back on takeAll', () => {
    const t = new CookieTable<number>();
    const cookies = new Set<string>();
    const live = new Map<number, number>();
    let n = 0;
    // Random adds and deletes: the live cookies are always distinct and map to their values.
    let seed = 7;
    const rand = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    for (let step = 0; step < 2000; step++) {
      if (live.size === 0 || rand() < 0.55) {
        const v = n++;
        const slot = t.add(v);
        const key = `${t.generation(slot)}:${slot}`;
        expect(cookies.has(key)).toBe(false);
        cookies.add(key);
        live.set(slot, v);
      } else {
        const slots = [...live.keys()];
        const slot = slots[Math.floor(rand() * slots.length)]!;
        expect(t.delete(slot)).toBe(live.get(slot));
        live.delete(slot);
      }
      expect(t.size).toBe(live.size);
    }
    for (const [slot, v] of live) expect(t.get(t.generation(slot), slot)).toBe(v);
    expect(t.takeAll().sort((x, y) => x - y)).toEqual([...live.values()].sort((x, y) => x - y));
    expect(t.size).toBe(0);
  });
});
