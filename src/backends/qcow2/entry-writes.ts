/**
 * The L2 entries one request changed, written to the file before the request completes — so a
 * daemon killed after the reply loses nothing — and the host clusters the request released, which
 * may be freed only once those writes are in the file (see docs/qcow2.md, "Crash-safe ordering").
 *
 * The request holds the exclusive range lock over its clusters from the change until `write`
 * resolves, so no other request changes or writes these entries meanwhile; each run of contiguous
 * changed entries goes out as one write of the table's own bytes, and the tables stay pinned in the
 * L2 cache until then (a reload from the file could otherwise miss an entry still being written).
 */
import type { FilePort } from '../../io/file-port.js';
import type { L2Table } from './l2-cache.js';

export class EntryWrites {
  private readonly touched = new Map<L2Table, number[]>();
  /** Host cluster indices whose references this request dropped. */
  readonly frees: number[] = [];

  constructor(private readonly entrySize: number) {}

  get empty(): boolean {
    return this.touched.size === 0;
  }

  /** Records that the entry at byte `entry` of `table` changed; pins the table until `write` ends. */
  touch(table: L2Table, entry: number): void {
    let entries = this.touched.get(table);
    if (!entries) {
      entries = [];
      this.touched.set(table, entries);
      table.pins++;
    }
    entries.push(entry);
  }

  /** Writes every changed entry (one write per contiguous run), then unpins; rejects if any write failed. */
  async write(port: FilePort): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const [table, entries] of this.touched) {
      entries.sort((x, y) => x - y);
      for (let i = 0; i < entries.length; ) {
        let j = i + 1;
        while (j < entries.length && entries[j]! <= entries[j - 1]! + this.entrySize) j++;
        const start = entries[i]!;
        const end = entries[j - 1]! + this.entrySize;
        writes.push(port.writeAt(table.data.subarray(start, end), table.offset + start));
        i = j;
      }
    }
    const results = await Promise.allSettled(writes);
    for (const table of this.touched.keys()) table.pins--;
    this.touched.clear();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }
}
