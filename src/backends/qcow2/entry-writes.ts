/**
 * Writing changed L2 entries to the file before the request that changed them completes — so a
 * daemon killed after the reply loses nothing — and the host clusters that request released,
 * which may be freed only once those writes are in the file (docs/qcow2.md, "Crash-safe ordering").
 *
 * `EntryWrites` is one request's part: the entries it changed, per table (each pinned in the L2
 * cache until written: a reload from the file could otherwise miss an entry still in flight).
 * `TableWriter` is one table's part: it merges the entries every request of a turn changed into
 * few writes (runs closer than a page go out as one) and never has two writes of a table in flight,
 * so each write carries a copy of the table's latest bytes and a later one always lands last. A
 * write may carry entries of other requests; that is safe because an entry is changed in memory
 * only once it may reach the disk (its data written, and synced when its absence would show).
 */
import { turnEnd } from '../../core/batch.js';
import type { FilePort } from '../../io/file-port.js';
import type { L2Table } from './l2-tables.js';

/** Entries of one table closer than this many bytes are written together. */
const MERGE_GAP = 4096;

/** Each table's writer, made on first use (kept beside the table, not in it: no import cycle). */
const writers = new WeakMap<L2Table, TableWriter>();

function writerOf(table: L2Table, port: FilePort): TableWriter {
  let w = writers.get(table);
  if (!w) {
    w = new TableWriter(table, port);
    writers.set(table, w);
  }
  return w;
}

export class TableWriter {
  private ranges: [number, number][] = [];
  private next: Promise<void> | null = null;
  private running: Promise<void> = Promise.resolve();

  constructor(
    private readonly table: L2Table,
    private readonly port: FilePort,
  ) {}

  /** Resolves once bytes [lo, hi) of the table, as they are now or newer, are in the file. */
  write(lo: number, hi: number): Promise<void> {
    this.ranges.push([lo, hi]);
    // After the running write, and one turn later, so the other requests of this turn join in.
    this.next ??= this.running
      .catch(() => undefined)
      .then(turnEnd)
      .then(() => this.issue());
    return this.next;
  }

  private issue(): Promise<void> {
    this.next = null;
    const ranges = this.ranges.sort((x, y) => x[0] - y[0]);
    this.ranges = [];
    const writes: Promise<void>[] = [];
    for (let i = 0; i < ranges.length; ) {
      let [lo, hi] = ranges[i]!;
      let j = i + 1;
      for (; j < ranges.length && ranges[j]![0] <= hi + MERGE_GAP; j++) hi = Math.max(hi, ranges[j]![1]);
      // A copy: requests of the next turn may change these bytes while the write is in flight.
      writes.push(this.port.writeAt(Buffer.from(this.table.data.subarray(lo, hi)), this.table.offset + lo));
      i = j;
    }
    this.running = Promise.all(writes).then(() => undefined);
    return this.running;
  }
}

export class EntryWrites {
  private readonly touched = new Map<L2Table, number[]>();
  /** Host cluster indices whose references this request dropped. */
  readonly frees: number[] = [];

  constructor(
    private readonly entrySize: number,
    private readonly port: FilePort,
  ) {}

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

  /** Writes every entry touched so far (contiguous runs together), then unpins; rejects if a write failed. */
  async write(): Promise<void> {
    const touched = [...this.touched];
    this.touched.clear();
    const writes: Promise<void>[] = [];
    for (const [table, entries] of touched) {
      entries.sort((x, y) => x - y);
      const writer = writerOf(table, this.port);
      for (let i = 0; i < entries.length; ) {
        let j = i + 1;
        while (j < entries.length && entries[j]! <= entries[j - 1]! + this.entrySize) j++;
        writes.push(writer.write(entries[i]!, entries[j - 1]! + this.entrySize));
        i = j;
      }
    }
    const results = await Promise.allSettled(writes);
    for (const [table] of touched) table.pins--;
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }
}
