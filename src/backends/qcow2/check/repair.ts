/**
 * Repair after a scan (scan.ts): the refcounts are rebuilt from what the image references, the
 * way qemu's `rebuild_refcount_structure` does it — a new refcount table and blocks written to
 * clusters nothing uses (not the old structure's), made durable, and only then the header switched
 * to them in one 12-byte write. A crash before the switch leaves the old structure in force; after
 * it, the new one; the old structure's clusters are simply free. Then, with `all`, the COPIED
 * flags of active L1/L2 entries are set exactly where the new count is 1.
 *
 *   leaks  counts above the references drop to them (wasted space comes back);
 *   all    every count becomes the number of references (clusters in use can no longer be
 *          handed out twice), and COPIED flags follow.
 *
 * Entry errors (reserved bits, unaligned or out-of-file offsets, clusters used as two kinds of
 * metadata) are not repaired: they stay corruptions, and the image stays refused for writing.
 * While any is left, leaked clusters are not reclaimed either (unlike qemu): what nothing
 * references any more may be the data a damaged entry lost, and stays for a human to recover.
 */
import type { FilePort } from '../../../io/file-port.js';
import { ENTRY_COPIED_HI, HEADER, maxRefcount, setRefcount, u32, u64, writeU64, type Geometry, MAX_REFCOUNT_TABLE_BYTES, corrupt } from '../format/index.js';
import type { ScanResult } from './scan.js';

export type RepairMode = 'leaks' | 'all';

export interface RepairResult {
  leaksFixed: number;
  corruptionsFixed: number;
}

/** The counts to store: per cluster, what `mode` makes of the stored and referenced counts. */
function targetCounts(scan: ScanResult, g: Geometry, mode: RepairMode): { target: Uint32Array; leaksFixed: number; corruptionsFixed: number } {
  const { refs, stored } = scan;
  const max = maxRefcount(g.refcountOrder);
  // As the scan: counts past the file and past everything referenced are not carried over (a
  // refcount table entry far out, however damaged, never sizes an array).
  const highest = Math.max(refs.length, scan.fileClusters);
  const target = new Uint32Array(highest);
  // The old structure is no longer referenced once the header names the new one.
  const structure = new Uint32Array(highest);
  for (const c of stored.structureClusters) structure[c]!++;
  let leaksFixed = 0;
  let corruptionsFixed = 0;
  // With entries damaged beyond repair, a cluster nothing references may be the lost data: kept.
  const reclaim = scan.entryErrors.length === 0;
  for (let c = 0; c < highest; c++) {
    const s = stored.get(c);
    const r = refs.count(c);
    const want = Math.min(r - structure[c]!, max);
    if (s > r && reclaim) {
      leaksFixed++;
      target[c] = want;
    } else if (s < r && mode === 'all' && r <= max) {
      corruptionsFixed++;
      target[c] = want;
    } else {
      // Unchanged (or a corruption left alone): the count keeps its meaning in the new structure.
      target[c] = Math.max(0, Math.min(s, max) - (s === r ? structure[c]! : 0));
    }
  }
  return { target, leaksFixed, corruptionsFixed };
}

/** Where the new structure goes: clusters free in both the old counts and the references, and not the old structure's. */
class Placement {
  private cursor = 1;
  constructor(
    public target: Uint32Array,
    private readonly busy: (c: number) => boolean,
  ) {}

  private free(c: number): boolean {
    return c >= this.target.length || (this.target[c] === 0 && !this.busy(c));
  }

  /** `n` contiguous free clusters, counted; the first one's index. */
  run(n: number): number {
    for (let c = this.cursor; ; c++) {
      let k = 0;
      while (k < n && this.free(c + k)) k++;
      if (k === n) {
        this.grow(c + n);
        for (let j = 0; j < n; j++) this.target[c + j] = 1;
        if (n === 1) this.cursor = c + 1;
        return c;
      }
      c += k;
    }
  }

  release(first: number, n: number): void {
    for (let c = first; c < first + n; c++) this.target[c] = 0;
  }

  private grow(n: number): void {
    if (n <= this.target.length) return;
    const t = new Uint32Array(Math.max(n, this.target.length * 2));
    t.set(this.target);
    this.target = t;
  }
}

/** Rebuilds the refcount structure (and, with `all`, the COPIED flags); durable when it resolves. */
export async function repairRefcounts(port: FilePort, g: Geometry, scan: ScanResult, mode: RepairMode): Promise<RepairResult> {
  const cs = g.clusterSize;
  const E = g.refcountsPerBlock;
  const { target, leaksFixed, corruptionsFixed } = targetCounts(scan, g, mode);
  const result: RepairResult = { leaksFixed, corruptionsFixed };
  if (leaksFixed > 0 || corruptionsFixed > 0 || (mode === 'all' && scan.structureErrors.length > 0)) {
    const oldStructure = new Set(scan.stored.structureClusters);
    const place = new Placement(target, (c) => oldStructure.has(c) || scan.refs.count(c) > 0);
    const blocks = new Map<number, number>();
    let table = { first: 0, clusters: 0 };
    for (;;) {
      let added = false;
      const t = place.target;
      for (let c = 0; c < t.length; c += 1) {
        if (t[c] === 0) continue;
        const b = Math.floor(c / E);
        if (!blocks.has(b)) {
          blocks.set(b, place.run(1));
          added = true;
        }
        c = (b + 1) * E - 1; // the rest of this block's range is covered
      }
      const need = Math.ceil(((Math.max(...blocks.keys()) + 1) * 8) / cs);
      if (need > table.clusters) {
        if (table.clusters > 0) place.release(table.first, table.clusters);
        if (need * cs > MAX_REFCOUNT_TABLE_BYTES) throw corrupt(`a rebuilt refcount table would exceed ${MAX_REFCOUNT_TABLE_BYTES} bytes`);
        table = { first: place.run(need), clusters: need };
        added = true;
      }
      if (!added) break;
    }
    const counts = place.target;
    const writes: Promise<void>[] = [];
    const tableData = Buffer.alloc(table.clusters * cs);
    for (const [b, at] of blocks) {
      const block = Buffer.alloc(cs);
      for (let k = 0; k < E && b * E + k < counts.length; k++) if (counts[b * E + k]) setRefcount(block, k, g.refcountOrder, counts[b * E + k]!);
      writes.push(port.writeAt(block, at * cs));
      writeU64(tableData, b * 8, at * cs);
    }
    writes.push(port.writeAt(tableData, table.first * cs));
    await Promise.all(writes);
    await port.fsync();
    // refcount_table_offset and refcount_table_clusters are adjacent: one write switches both.
    await port.writeAt(Buffer.concat([u64(table.first * cs), u32(table.clusters)]), HEADER.refcountTableOffset);
    await port.fsync();
    if (mode === 'all') result.corruptionsFixed += await fixCopied(port, scan, counts);
  } else if (mode === 'all') {
    result.corruptionsFixed += await fixCopied(port, scan, target);
  }
  return result;
}

/** Sets COPIED on active entries whose count is 1 and clears it elsewhere; returns how many changed. */
async function fixCopied(port: FilePort, scan: ScanResult, counts: Uint32Array): Promise<number> {
  const wrong: { at: number; hi: number }[] = [];
  scan.copied.forEachMismatch(
    (c) => c < counts.length && counts[c] === 1,
    (e) => wrong.push({ at: e.at, hi: (e.hi ^ ENTRY_COPIED_HI) >>> 0 }),
  );
  for (const e of wrong) await port.writeAt(u32(e.hi), e.at);
  const fixed = wrong.length;
  if (fixed > 0) await port.fsync();
  return fixed;
}
