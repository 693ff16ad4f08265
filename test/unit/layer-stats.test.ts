import { describe, expect, it } from 'vitest';
import { BlockQueue } from '../../src/core/queue.js';
import { LATENCY_BUCKETS, StatsLayer, latencyBucket } from '../../src/layers/stats.js';
import { TestBackend } from '../helpers/test-backend.js';

describe('StatsLayer', () => {
  it('counts operations, bytes, errors and latencies per operation', async () => {
    const backend = new TestBackend(1 << 20);
    const stats = new StatsLayer(backend);
    const q = new BlockQueue(stats);
    await Promise.all([q.write(0, Buffer.alloc(4096)), q.write(8192, Buffer.alloc(512))]);
    await q.read(0, 100);
    await q.writeZeroes(0, 65536);
    await q.trim(0, 4096);
    await q.flush();
    backend.failNext.read = 5;
    await expect(q.read(0, 1)).rejects.toThrow();
    const s = stats.snapshot();
    expect(s.write).toMatchObject({ count: 2, bytes: 4608, errors: 0 });
    expect(s.read).toMatchObject({ count: 2, bytes: 100, errors: 1 });
    expect(s.writeZeroes).toMatchObject({ count: 1, bytes: 65536 });
    expect(s.trim).toMatchObject({ count: 1, bytes: 4096 });
    expect(s.flush.count).toBe(1);
    for (const op of Object.values(s)) {
      expect(op.latencyUs).toHaveLength(LATENCY_BUCKETS);
      expect(op.latencyUs.reduce((a, b) => a + b, 0)).toBe(op.count);
      expect(op.maxUs).toBeLessThanOrEqual(op.totalUs);
    }
    // Snapshots are copies.
    s.write.count = 99;
    expect(stats.snapshot().write.count).toBe(2);
  });

  it('buckets latencies by powers of two in microseconds', () => {
    expect([0.5, 1, 1.9, 2, 3, 1000, 1e12].map(latencyBucket)).toEqual([0, 1, 1, 2, 2, 10, LATENCY_BUCKETS - 1]);
  });
});
