/**
 * Writes: per cluster, a plan (in place when the host cluster is normal and ours alone, else a
 * fresh cluster from the pool with the untouched parts copied from the old mapping), then the
 * data, then the L2 entries — in the order that keeps a power loss from showing the guest bytes
 * it never wrote (see `writeLocked`).
 */
import { turnEnd } from '../../core/batch.js';
import { isAllZero } from '../../core/zeroes.js';
import type { Allocator } from './allocator.js';
import type { EntryWrites } from './entry-writes.js';
import { ALL_UNITS, corrupt, ENTRY_COMPRESSED_HI, ENTRY_COPIED_HI, ENTRY_ZERO_LO, entryOffset, hex, L2_ALLOC_BITS, L2_ZERO_BITS, unitMask, writeEntry } from './format/index.js';
import type { L2Table, L2Tables } from './l2-tables.js';
import type { Reader } from './read.js';
import type { ImageState } from './state.js';

/** Whether `buf` is all zeroes; true when absent. */
export function isZero(buf: Buffer | undefined): boolean {
  return !buf || isAllZero(buf);
}

/** Per-cluster plan of an allocating or in-place write (see `plan`). */
interface WritePlan {
  table: L2Table;
  entry: number; // byte index of the L2 entry in table.data
  ci: number; // guest cluster index
  a: number; // new data [a, b) within the cluster
  b: number;
  spanStart: number; // bytes of the host cluster to write, including copy-on-write head/tail
  spanEnd: number;
  host: number; // target host cluster offset (set by allocation when `fresh`)
  fresh: boolean;
  zeroHost: boolean; // a fresh host cluster known to read as zeroes
  zeroSource: boolean; // the old mapping reads as zeroes without I/O (zero flag, or no backing data)
  changed: boolean; // the L2 entry must be rewritten (false for plain in-place overwrites)
  freeOld: number[]; // host cluster indices to release once the new entry is durable
  alloc: number; // extended L2: new allocation / zero bitmaps
  zero: number;
  dataOffset: number; // where [a, b) starts in the caller's buffer
  head?: Buffer;
  tail?: Buffer;
}

export class Writer {
  private dataSync: Promise<void> | null = null;

  constructor(
    private readonly st: ImageState,
    private readonly tables: L2Tables,
    private readonly alloc: Allocator,
    private readonly reader: Reader,
    /** Writes a request's changed entries (commit.ts). */
    private readonly writeEntries: (w: EntryWrites) => Promise<void>,
  ) {}

  /** Writes `data` at guest `offset`, recording the changed entries in `w`. The caller holds the range lock. */
  async writeLocked(offset: number, data: Buffer, w: EntryWrites): Promise<void> {
    const { cs, g } = this.st;
    const plans: WritePlan[] = [];
    const pinned: L2Table[] = [];
    try {
      const tableSpan = g.l2Entries * cs;
      const end = offset + data.length;
      let pos = offset;
      while (pos < end) {
        const l1i = Math.floor(pos / tableSpan);
        const table = this.tables.cachedForWrite(l1i) ?? (await this.tables.forWrite(l1i));
        pinned.push(table);
        const tableEnd = Math.min(end, (l1i + 1) * tableSpan);
        while (pos < tableEnd) {
          const ci = Math.floor(pos / cs);
          const clusterStart = ci * cs;
          const b = Math.min(tableEnd, clusterStart + cs) - clusterStart;
          plans.push(this.plan(table, l1i, ci, pos - clusterStart, b, pos - offset));
          pos = clusterStart + b;
        }
      }
      const fresh = plans.reduce((n, p) => n + (p.fresh ? 1 : 0), 0);
      if (fresh > 0) {
        while (this.alloc.available < fresh) await this.alloc.reserve(fresh);
        this.allocateFresh(plans); // synchronous after the check above
      }
      const cow = plans.filter((p) => p.spanStart < p.a || p.b < p.spanEnd);
      if (cow.length > 0) await Promise.all(cow.map((p) => this.fillCow(p)));
      // An entry naming a cluster whose unwritten bytes may differ from the old contents (copy-on-
      // write from a backing file or compressed cluster, a reused unpunched cluster, subclusters)
      // must not reach the disk before the data: after a power loss the guest would see bytes it
      // never wrote. A fresh zero cluster replacing zeroes reads as the old contents until its data
      // lands, so its entry goes out together with the data (the range lock keeps readers away).
      if (plans.some((p) => p.changed && !(p.fresh && p.zeroHost && p.zeroSource))) {
        await this.writeData(plans, data);
        this.st.unsyncedData = true;
        await this.syncData();
        this.setEntries(plans, w);
      } else {
        this.setEntries(plans, w);
        if (w.empty) {
          // A plain overwrite in place (the common write to an allocated image): data only.
          try {
            await this.writeData(plans, data);
          } finally {
            this.st.unsyncedData = true;
          }
          return;
        }
        const [written, linked] = await Promise.allSettled([this.writeData(plans, data), this.writeEntries(w)]);
        this.st.unsyncedData = true;
        if (written.status === 'rejected') throw written.reason;
        if (linked.status === 'rejected') throw linked.reason;
      }
    } finally {
      for (const t of pinned) this.tables.release(t);
    }
  }

  /**
   * Decides how one cluster takes new data [a, b): in place when its host cluster is normal and
   * exclusively ours, else into a fresh cluster with the untouched parts copied from the old
   * mapping (whole cluster; with extended L2 only the partly written subclusters of an empty one).
   */
  private plan(table: L2Table, l1i: number, ci: number, a: number, b: number, dataOffset: number): WritePlan {
    const { st } = this;
    const { g, cs } = st;
    const entry = (ci - l1i * g.l2Entries) * g.l2EntrySize;
    const hi = table.data.readUInt32BE(entry);
    const lo = table.data.readUInt32BE(entry + 4);
    const plan: WritePlan = { table, entry, ci, a, b, spanStart: 0, spanEnd: cs, host: 0, fresh: true, zeroHost: false, zeroSource: false, changed: true, freeOld: [], alloc: ALL_UNITS, zero: 0, dataOffset };
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      st.checkCompressed(hi, lo, ci);
      plan.freeOld = st.compressedClusters(hi, lo);
      return plan;
    }
    st.checkEntryBits(hi, lo, ci);
    const host = entryOffset(hi, lo);
    if (host !== 0) st.checkDataHost(host, ci);
    const exclusive = host !== 0 && st.isExclusive(hi, host);
    const zeroFlag = st.v3 && !g.extendedL2 && (lo & ENTRY_ZERO_LO) !== 0;
    plan.zeroSource = zeroFlag || (host === 0 && (st.backing === null || ci * cs >= st.backing.size));
    if (!g.extendedL2) {
      if (exclusive) {
        plan.fresh = false;
        plan.host = host;
        if (!zeroFlag) {
          plan.spanStart = a;
          plan.spanEnd = b;
          plan.changed = (hi & ENTRY_COPIED_HI) === 0;
        }
      } else if (host !== 0) {
        plan.freeOld = [host / cs];
      }
      return plan;
    }
    const u = g.unitSize;
    const zeroBits = table.data.readUInt32BE(entry + L2_ZERO_BITS);
    const allocBits = table.data.readUInt32BE(entry + L2_ALLOC_BITS);
    const su = Math.floor(a / u);
    const eu = Math.ceil(b / u);
    const mask = unitMask(su, eu);
    if (host !== 0 && !exclusive) {
      plan.freeOld = [host / cs];
      return plan;
    }
    if (host === 0 && allocBits !== 0) throw corrupt(`L2 entry of guest offset ${hex(ci * cs)} has allocated subclusters but no host cluster`);
    plan.alloc = (allocBits | mask) >>> 0;
    plan.zero = (zeroBits & ~mask) >>> 0;
    plan.spanStart = (allocBits >>> su) & 1 ? a : su * u;
    plan.spanEnd = (allocBits >>> (eu - 1)) & 1 ? b : eu * u;
    if (host !== 0) {
      plan.fresh = false;
      plan.host = host;
      plan.changed = (hi & ENTRY_COPIED_HI) === 0 || plan.alloc !== allocBits || plan.zero !== zeroBits;
    }
    return plan;
  }

  /** Points the L2 entries of the plans that change one at their (new) host clusters. */
  private setEntries(plans: WritePlan[], w: EntryWrites): void {
    for (const p of plans) {
      if (!p.changed) continue;
      const d = p.table.data;
      writeEntry(d, p.entry, p.host, true, false);
      if (this.st.g.extendedL2) {
        d.writeUInt32BE(p.zero, p.entry + L2_ZERO_BITS);
        d.writeUInt32BE(p.alloc, p.entry + L2_ALLOC_BITS);
      }
      w.touch(p.table, p.entry);
      for (const c of p.freeOld) w.frees.push(c);
    }
  }

  /** Gives every plan needing a fresh cluster one from the pool, contiguous for consecutive clusters. */
  private allocateFresh(plans: WritePlan[]): void {
    const cs = this.st.cs;
    for (let i = 0; i < plans.length; ) {
      if (!plans[i]!.fresh) {
        i++;
        continue;
      }
      let j = i + 1;
      while (j < plans.length && plans[j]!.fresh && plans[j]!.ci === plans[j - 1]!.ci + 1) j++;
      for (let k = i; k < j; ) {
        const run = this.alloc.take(j - k);
        for (let m = 0; m < run.count; m++) {
          const p = plans[k + m]!;
          p.host = run.offset + m * cs;
          p.zeroHost = this.alloc.readsAsZero(p.host / cs);
          this.alloc.unpunch(p.host / cs);
        }
        k += run.count;
      }
      i = j;
    }
  }

  /**
   * Reads the copy-on-write head and tail of a plan. When they are zeroes and the fresh host
   * cluster is known to read as zeroes already, they are dropped and only the new data is written
   * (what QEMU does with a zero-write of the cluster first); when the old mapping is known to be
   * zeroes, nothing is read.
   */
  private async fillCow(p: WritePlan): Promise<void> {
    if (p.zeroHost && p.zeroSource) {
      p.spanStart = p.a;
      p.spanEnd = p.b;
      return;
    }
    const guest = p.ci * this.st.cs;
    const [head, tail] = await Promise.all([
      p.spanStart < p.a ? this.reader.readForCow(guest + p.spanStart, p.a - p.spanStart) : undefined,
      p.b < p.spanEnd ? this.reader.readForCow(guest + p.b, p.spanEnd - p.b) : undefined,
    ]);
    if (p.zeroHost && isZero(head) && isZero(tail)) {
      p.spanStart = p.a;
      p.spanEnd = p.b;
      return;
    }
    p.head = head;
    p.tail = tail;
  }

  /** Writes the planned spans, one (vectored) file write per run of contiguous host bytes. */
  private async writeData(plans: WritePlan[], data: Buffer): Promise<void> {
    const { st } = this;
    const writes: Promise<void>[] = [];
    let start = -1;
    let end = -1;
    let bufs: Buffer[] = [];
    const flushGroup = (): void => {
      if (bufs.length === 1) writes.push(st.port.writeAt(bufs[0]!, start));
      else if (bufs.length > 1) writes.push(st.port.writevAt(bufs, start));
      bufs = [];
    };
    for (const p of plans) {
      if (st.isMetadata(p.host / st.cs)) throw st.overlap(p.host / st.cs, `a data write of guest offset ${hex(p.ci * st.cs)}`);
      const at = p.host + p.spanStart;
      if (at !== end) {
        flushGroup();
        start = at;
      }
      if (p.head) bufs.push(p.head);
      bufs.push(data.subarray(p.dataOffset, p.dataOffset + p.b - p.a));
      if (p.tail) bufs.push(p.tail);
      end = p.host + p.spanEnd;
    }
    flushGroup();
    await Promise.all(writes);
  }

  /**
   * One fdatasync shared by the requests of this turn that wait for their data to be durable
   * before their L2 entries are written. A request joins only a sync not yet started, so its data,
   * written before it joined, is covered.
   */
  syncData(): Promise<void> {
    this.dataSync ??= turnEnd().then(() => {
      this.dataSync = null;
      return this.st.port.fsync();
    });
    return this.dataSync;
  }
}
