/**
 * Write-zeroes and discard: whole clusters (whole subclusters with extended L2) change metadata
 * only — zero flags, zero bits, or the mapping dropped with its host cluster released to the next
 * commit — and the partial rest is written as zero data through the writer.
 */
import type { EntryWrites } from './entry-writes.js';
import { ALL_UNITS, ENTRY_COMPRESSED_HI, entryOffset, L2_ALLOC_BITS, L2_ZERO_BITS, unitMask, writeEntry } from './format/index.js';
import type { L2Tables } from './l2-tables.js';
import type { ImageState } from './state.js';
import type { Writer } from './write.js';

export class Discarder {
  constructor(
    private readonly st: ImageState,
    private readonly tables: L2Tables,
    private readonly writer: Writer,
  ) {}

  /**
   * Write-zeroes. Without NO_HOLE an allocation is released; with it an exclusively owned cluster
   * is kept and flagged zero (v3). v2 has no zero flag: a cluster may be deallocated only when no
   * backing file shows through.
   */
  async zeroLocked(offset: number, length: number, noHole: boolean, w: EntryWrites): Promise<void> {
    const { st } = this;
    const { cs, g } = st;
    const partial: [number, number][] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const ci = Math.floor(pos / cs);
      const clusterStart = ci * cs;
      const a = pos - clusterStart;
      const clusterEnd = Math.min(end, clusterStart + cs);
      const b = clusterEnd - clusterStart;
      // The cluster counts as wholly covered when the rest lies past the virtual size.
      const whole = a === 0 && (b === cs || clusterEnd >= st.size);
      pos = clusterEnd;
      if (g.extendedL2) {
        await this.zeroSubclusters(ci, a, whole ? cs : b, noHole, partial, w);
      } else if (!whole || (!st.v3 && (st.backing !== null || noHole))) {
        partial.push([clusterStart + a, b - a]);
      } else {
        await this.changeEntry(ci, w, (d, e, hi, lo) => {
          const keep = st.v3 && noHole && (hi & ENTRY_COMPRESSED_HI) === 0 && entryOffset(hi, lo) !== 0 && st.isExclusive(hi, entryOffset(hi, lo));
          if (keep) {
            writeEntry(d, e, entryOffset(hi, lo), true, true);
          } else {
            this.release(hi, lo, w);
            writeEntry(d, e, 0, false, st.v3);
          }
          return true;
        });
      }
    }
    for (const [at, n] of partial) await this.writer.writeLocked(at, Buffer.alloc(n), w);
  }

  /** Extended L2 zeroing of [a, b) in cluster `ci`: subcluster zero bits, zero data for the rest. */
  private async zeroSubclusters(ci: number, a: number, b: number, noHole: boolean, partial: [number, number][], w: EntryWrites): Promise<void> {
    const { st } = this;
    const { cs, g } = st;
    const u = g.unitSize;
    const clusterStart = ci * cs;
    const su = Math.ceil(a / u);
    const eu = Math.floor(b / u);
    if (su >= eu) {
      partial.push([clusterStart + a, Math.min(b, st.size - clusterStart) - a]);
      return;
    }
    if (a < su * u) partial.push([clusterStart + a, su * u - a]);
    if (eu * u < b) partial.push([clusterStart + eu * u, Math.min(b, st.size - clusterStart) - eu * u]);
    await this.changeEntry(ci, w, (d, e, hi, lo) => {
      const mask = unitMask(su, eu);
      if ((hi & ENTRY_COMPRESSED_HI) !== 0 || (mask === ALL_UNITS && !noHole)) {
        if ((hi & ENTRY_COMPRESSED_HI) !== 0 && mask !== ALL_UNITS) {
          // A compressed cluster has no subclusters: zero its part by rewriting it.
          partial.push([clusterStart + su * u, (eu - su) * u]);
          return false;
        }
        this.release(hi, lo, w);
        writeEntry(d, e, 0, false, false);
        d.writeUInt32BE(ALL_UNITS, e + L2_ZERO_BITS);
        d.writeUInt32BE(0, e + L2_ALLOC_BITS);
      } else {
        d.writeUInt32BE((d.readUInt32BE(e + L2_ZERO_BITS) | mask) >>> 0, e + L2_ZERO_BITS);
        d.writeUInt32BE((d.readUInt32BE(e + L2_ALLOC_BITS) & ~mask) >>> 0, e + L2_ALLOC_BITS);
      }
      return true;
    });
  }

  /**
   * Discard, as QEMU does it for NBD/guest discards: whole clusters only (plus a partial last
   * cluster at the end of the image); afterwards they read as zeroes on v3 (zero flag or zero
   * bits when a backing file could show through). v2 images with a backing file ignore discards,
   * since freeing would expose stale backing data.
   */
  async trimLocked(offset: number, length: number, w: EntryWrites): Promise<void> {
    const { st } = this;
    const { cs, g } = st;
    if (!st.v3 && st.backing) return;
    const end = offset + length;
    for (let ci = Math.ceil(offset / cs); ci * cs < end; ci++) {
      const clusterStart = ci * cs;
      if (clusterStart + cs > end && end < st.size) break;
      await this.changeEntry(ci, w, (d, e, hi, lo) => {
        this.release(hi, lo, w);
        if (g.extendedL2) {
          writeEntry(d, e, 0, false, false);
          d.writeUInt32BE(st.backing ? ALL_UNITS : 0, e + L2_ZERO_BITS);
          d.writeUInt32BE(0, e + L2_ALLOC_BITS);
        } else {
          writeEntry(d, e, 0, false, st.v3 && st.backing !== null);
        }
        return true;
      });
    }
  }

  /**
   * Changes the L2 entry of guest cluster `ci`: `change` gets the table's bytes, the entry's byte
   * index and its two words, changes the entry in place and says whether it did; a changed entry
   * is recorded in `w`. The table is loaded (or created) for writing and pinned meanwhile. Nothing
   * happens when there is no table and no backing file: the cluster already reads as zeroes and
   * stays unmapped.
   */
  private async changeEntry(ci: number, w: EntryWrites, change: (d: Buffer, e: number, hi: number, lo: number) => boolean): Promise<void> {
    const { st } = this;
    const l1i = Math.floor(ci / st.g.l2Entries);
    if (st.l1Offset(l1i) === 0 && !st.backing) return;
    const table = await this.tables.forWrite(l1i);
    try {
      const e = (ci - l1i * st.g.l2Entries) * st.g.l2EntrySize;
      const hi = table.data.readUInt32BE(e);
      const lo = table.data.readUInt32BE(e + 4);
      // A damaged entry fails the request before anything changes (its clusters are never freed).
      if ((hi & ENTRY_COMPRESSED_HI) !== 0) st.checkCompressed(hi, lo, ci);
      else {
        st.checkEntryBits(hi, lo, ci);
        if (entryOffset(hi, lo) !== 0) st.checkDataHost(entryOffset(hi, lo), ci);
      }
      if (change(table.data, e, hi, lo)) w.touch(table, e);
    } finally {
      this.tables.release(table);
    }
  }

  /** Records the host clusters an entry holds (normal or compressed), to free once it is rewritten. */
  private release(hi: number, lo: number, w: EntryWrites): void {
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      for (const c of this.st.compressedClusters(hi, lo)) w.frees.push(c);
      return;
    }
    const host = entryOffset(hi, lo);
    if (host !== 0) w.frees.push(host / this.st.cs);
  }
}
