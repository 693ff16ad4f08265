/** The batch contract (src/core/batch.ts) on its own. */
import { describe, expect, it } from 'vitest';
import { afterBatch, inBatch, runBatch, turnEnd } from '../../src/core/batch.js';

describe('runBatch / afterBatch', () => {
  it('runs per-batch work once the last request is issued, before any completion', async () => {
    const log: string[] = [];
    runBatch(() => {
      expect(inBatch()).toBe(true);
      for (const r of ['a', 'b', 'c']) {
        log.push(`issue ${r}`);
        void Promise.resolve().then(() => log.push(`complete ${r}`));
        if (r !== 'b') afterBatch(() => log.push(`after (from ${r})`));
      }
    });
    expect(inBatch()).toBe(false);
    expect(log).toEqual(['issue a', 'issue b', 'issue c', 'after (from a)', 'after (from c)']);
    await Promise.resolve();
    expect(log.slice(5)).toEqual(['complete a', 'complete b', 'complete c']);
  });

  it('treats a batch issued inside another as the same batch', () => {
    const log: string[] = [];
    runBatch(() => {
      runBatch(() => afterBatch(() => log.push('inner')));
      log.push('outer issued');
    });
    expect(log).toEqual(['outer issued', 'inner']);
  });

  it('outside a batch defers to a microtask, still after the synchronous stretch', async () => {
    const log: string[] = [];
    afterBatch(() => log.push('after'));
    log.push('sync');
    expect(log).toEqual(['sync']);
    await Promise.resolve();
    expect(log).toEqual(['sync', 'after']);
  });

  it('still runs the per-batch work when issuing throws', () => {
    const log: string[] = [];
    expect(() =>
      runBatch(() => {
        afterBatch(() => log.push('after'));
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(log).toEqual(['after']);
    expect(inBatch()).toBe(false);
  });
});

describe('turnEnd', () => {
  it('is one promise per turn, resolved after the turn, and a new one the next turn', async () => {
    const a = turnEnd();
    const b = turnEnd();
    expect(a).toBe(b);
    let resolved = false;
    void a.then(() => (resolved = true));
    await Promise.resolve();
    expect(resolved).toBe(false);
    await new Promise((r) => setImmediate(r));
    expect(resolved).toBe(true);
    expect(turnEnd()).not.toBe(a);
  });
});
