/** The in-memory refcount allocator: no double allocation, self-counting blocks, table growth. */
import { describe, expect, it } from 'vitest';
import { Refcounts } from '../../src/backends/qcow2/refcounts.js';
import { geometryOf, getRefcount, setRefcount, V3_HEADER_LENGTH, type Qcow2Header } from '../../src/backends/qcow2/format/index.js';

const CS = 512;

/** A fresh image of 512 B clusters: header, table (1 cluster), one block, with `order`-bit refcounts. */
function fresh(order: number): Refcounts {
  const h = { clusterBits: 9, incompatibleFeatures: 0n, refcountOrder: order, version: 3, headerLength: V3_HEADER_LENGTH } as Qcow2Header;
  const g = geometryOf(h);
  const block = Buffer.alloc(CS);
  for (let c = 0; c < 3; c++) setRefcount(block, c, order, 1); // header, table, block
  return new Refcounts(g, CS, 1, [2 * CS, ...Array<number>(CS / 8 - 1).fill(0)], new Map([[0, block]]), 3 * CS);
}

describe('Refcounts', () => {
  it('never hands out a cluster twice and counts every block it creates', () => {
    for (const order of [0, 4, 6]) {
      const r = fresh(order);
      const taken = new Set<number>();
      for (let i = 0; i < 1500; i++) {
        const { offset, count } = r.allocateRun(1 + (i % 7));
        expect(count).toBeGreaterThan(0);
        for (let k = 0; k < count; k++) {
          const c = offset / CS + k;
          if (taken.has(c) || r.get(c) !== 1) throw new Error(`order ${order}: cluster ${c} handed out twice or not counted`);
          taken.add(c);
        }
      }
      const snap = r.takeDirty();
      // Every refcount block written is itself counted, and no allocated cluster is a block.
      for (const b of snap.blocks) {
        expect(r.get(b.offset / CS)).toBe(1);
        expect(taken.has(b.offset / CS)).toBe(false);
      }
      if (order === 6) {
        // 64 refcounts per 512 B block and 64 table entries per cluster: the table had to move.
        expect(snap.table).toBeDefined();
        expect(snap.oldTables).toEqual([{ offset: CS, clusters: 1 }]);
        const table = snap.table!;
        for (let c = table.offset / CS; c < table.offset / CS + table.clusters; c++) {
          expect(r.get(c)).toBe(1);
          expect(taken.has(c)).toBe(false);
        }
        // The written table names every block.
        const named = new Set<number>();
        for (let i = 0; i < table.data.length; i += 8) if (table.data.readBigUInt64BE(i)) named.add(Number(table.data.readBigUInt64BE(i)));
        for (const b of snap.blocks) expect(named.has(b.offset)).toBe(true);
        const block = snap.blocks.find((b) => b.offset === Number(table.data.readBigUInt64BE(8)))!;
        expect(getRefcount(block.data, 0, 6)).toBe(1); // a block placed at the first cluster it covers counts itself
      }
    }
  });

  it('reuses the lowest freed cluster', () => {
    const r = fresh(4);
    const a = r.allocate();
    const b = r.allocate();
    r.allocate();
    expect(r.decrement(b / CS)).toBe(0);
    expect(r.decrement(a / CS)).toBe(0);
    expect(r.allocate()).toBe(a);
    expect(r.allocate()).toBe(b);
    expect(() => r.decrement(0x100000 / CS)).toThrow(/refcount is already 0/);
  });

  it('reports dirty state once per snapshot', () => {
    const r = fresh(4);
    expect(r.dirty).toBe(false);
    r.allocate();
    expect(r.dirty).toBe(true);
    expect(r.takeDirty().blocks).toHaveLength(1);
    expect(r.dirty).toBe(false);
  });
});
