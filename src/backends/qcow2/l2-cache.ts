/**
 * A bounded least-recently-used cache of L2 tables, keyed by L1 index.
 *
 * Tables are kept as the raw big-endian cluster (`data`), read with `readUInt32BE` on lookup, so
 * the hot path builds no BigInt and copies nothing. Changed entries are written to the file by the
 * request that changed them, before it completes; a pinned table (a request is changing it, or its
 * entry writes are still in flight) is never evicted, so the cache may exceed its capacity until
 * they finish.
 */
import type { TableWriter } from './entry-writes.js';

export interface L2Table {
  /** Host offset of the table. */
  readonly offset: number;
  /** The table's cluster; owned by the cache, changed in place by writers. */
  readonly data: Buffer;
  pins: number;
  /** Set while a new table is being written and linked into L1; entry writers wait for it. */
  ready?: Promise<void>;
  /** Writes its changed entries (see entry-writes.ts); made on first use. */
  writer?: TableWriter;
}

export class L2Cache {
  private readonly tables = new Map<number, L2Table>();

  constructor(readonly capacity: number) {}

  /** The table for `l1Index` if cached; marks it most recently used. */
  get(l1Index: number): L2Table | undefined {
    const t = this.tables.get(l1Index);
    if (t) {
      this.tables.delete(l1Index);
      this.tables.set(l1Index, t);
    }
    return t;
  }

  insert(l1Index: number, table: L2Table): void {
    this.tables.set(l1Index, table);
    if (this.tables.size <= this.capacity) return;
    for (const [key, t] of this.tables) {
      if (this.tables.size <= this.capacity) break;
      if (t.pins === 0) this.tables.delete(key);
    }
  }
}
