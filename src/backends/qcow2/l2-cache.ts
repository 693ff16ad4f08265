/**
 * A bounded least-recently-used cache of L2 tables, keyed by L1 index.
 *
 * Tables are kept as the raw big-endian cluster (`data`), read with `readUInt32BE` on lookup, so
 * the hot path builds no BigInt and copies nothing. A dirty table (changed in memory, not yet
 * written by a commit) or a pinned one (an in-flight write will update it) is never evicted; the
 * cache may exceed its capacity until a commit cleans them.
 */
export interface L2Table {
  /** Host offset of the table. */
  readonly offset: number;
  /** The table's cluster; owned by the cache, changed in place by writers. */
  readonly data: Buffer;
  dirty: boolean;
  pins: number;
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
      if (!t.dirty && t.pins === 0) this.tables.delete(key);
    }
  }

  /** Dirty tables, for a commit. */
  *dirty(): Iterable<L2Table> {
    for (const t of this.tables.values()) if (t.dirty) yield t;
  }

  get dirtyCount(): number {
    let n = 0;
    for (const t of this.tables.values()) if (t.dirty) n++;
    return n;
  }
}
