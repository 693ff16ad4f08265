/**
 * The one L1 → L2 → subcluster mapping walk, shared by reads and block status: for a guest range
 * it reports, in order, which ranges are data in this file (and where), zeroes, compressed
 * clusters, or left to the backing chain — validating each entry as it goes. Block status is
 * that walk turned into extents.
 */
import type { Extent } from '../../core/backend.js';
import { corrupt, ENTRY_COMPRESSED_HI, ENTRY_ZERO_LO, entryOffset, hex, L2_ALLOC_BITS, L2_ZERO_BITS } from './format/index.js';
import type { L2Tables } from './l2-tables.js';
import type { ImageState } from './state.js';

export const MAP_DATA = 1;
export const MAP_ZERO = 2;
export const MAP_BACKING = 3;
export const MAP_COMPRESSED = 4;

/**
 * One mapped range: `length` guest bytes from `guest`. For MAP_DATA `host` is where they are in
 * the file; for MAP_COMPRESSED the range lies in one cluster and `hi`/`lo` are its descriptor.
 * A returned promise is awaited before the walk goes on.
 */
export type MapVisitor = (kind: number, guest: number, length: number, host: number, hi: number, lo: number) => void | Promise<void>;

/** Walks guest `[offset, end)`; the caller holds the range lock. */
export async function walkMapping(st: ImageState, tables: L2Tables, offset: number, end: number, visit: MapVisitor): Promise<void> {
  const { g, cs } = st;
  const tableSpan = g.l2Entries * cs;
  let pos = offset;
  while (pos < end) {
    const l1i = Math.floor(pos / tableSpan);
    const tableEnd = Math.min(end, (l1i + 1) * tableSpan);
    let taken = tables.acquire(l1i);
    if (taken instanceof Promise) taken = await taken;
    const table = taken;
    if (!table) {
      const r = visit(MAP_BACKING, pos, tableEnd - pos, 0, 0, 0);
      if (r) await r;
      pos = tableEnd;
      continue;
    }
    // Pinned until the walk leaves it: a visitor may wait (backing reads), and an evicted
    // table's buffer is reused for the next table loaded.
    try {
      const data = table.data;
      while (pos < tableEnd) {
        const ci = Math.floor(pos / cs);
        const clusterStart = ci * cs;
        const clusterEnd = Math.min(tableEnd, clusterStart + cs);
        const e = (ci - l1i * g.l2Entries) * g.l2EntrySize;
        const hi = data.readUInt32BE(e);
        const lo = data.readUInt32BE(e + 4);
        if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
          st.checkCompressed(hi, lo, ci);
          const r = visit(MAP_COMPRESSED, pos, clusterEnd - pos, 0, hi, lo);
          if (r) await r;
          pos = clusterEnd;
          continue;
        }
        st.checkEntryBits(hi, lo, ci);
        const host = entryOffset(hi, lo);
        if (host !== 0) st.checkDataHost(host, ci);
        if (!g.extendedL2) {
          const n = clusterEnd - pos;
          let r;
          if (st.v3 && (lo & ENTRY_ZERO_LO) !== 0) r = visit(MAP_ZERO, pos, n, 0, hi, lo);
          else if (host === 0) r = visit(MAP_BACKING, pos, n, 0, hi, lo);
          else r = visit(MAP_DATA, pos, n, host + pos - clusterStart, hi, lo);
          if (r) await r;
          pos = clusterEnd;
          continue;
        }
        const zeroBits = data.readUInt32BE(e + L2_ZERO_BITS);
        const allocBits = data.readUInt32BE(e + L2_ALLOC_BITS);
        if ((zeroBits & allocBits) !== 0) throw corrupt(`L2 entry of guest offset ${hex(clusterStart)} has subclusters both allocated and zero`);
        if (host === 0 && allocBits !== 0) throw corrupt(`L2 entry of guest offset ${hex(clusterStart)} has allocated subclusters but no host cluster`);
        while (pos < clusterEnd) {
          const sc = Math.floor((pos - clusterStart) / g.unitSize);
          const n = Math.min(clusterEnd, clusterStart + (sc + 1) * g.unitSize) - pos;
          let r;
          if ((allocBits >>> sc) & 1) r = visit(MAP_DATA, pos, n, host + pos - clusterStart, hi, lo);
          else if ((zeroBits >>> sc) & 1) r = visit(MAP_ZERO, pos, n, 0, hi, lo);
          else r = visit(MAP_BACKING, pos, n, 0, hi, lo);
          if (r) await r;
          pos += n;
        }
      }
    } finally {
      tables.release(table);
    }
  }
}

/** Largest extent walk per blockStatus call, in allocation units. */
const MAX_STATUS_UNITS = 65536;

/**
 * Block status of guest `[offset, offset + length)` (at most MAX_STATUS_UNITS units of it):
 * data and compressed clusters are data at depth 1, zeroes are zero holes at depth 1, the rest
 * comes from the backing chain one level deeper (a hole at depth 0 past its end).
 */
export async function blockStatus(st: ImageState, tables: L2Tables, offset: number, length: number): Promise<Extent[]> {
  const out: Extent[] = [];
  const push = (e: Extent): void => {
    const last = out[out.length - 1];
    if (last && last.hole === e.hole && last.zero === e.zero && last.depth === e.depth) last.length += e.length;
    else out.push({ ...e });
  };
  const fromBacking = async (at: number, n: number): Promise<void> => {
    const backing = st.backing;
    const inBacking = backing ? Math.max(0, Math.min(n, backing.size - at)) : 0;
    for (let done = 0; done < inBacking; ) {
      const exts = await backing!.blockStatus(at + done, inBacking - done);
      for (const x of exts) {
        const len = Math.min(x.length, inBacking - done);
        push({ length: len, hole: x.hole, zero: x.zero, depth: x.depth ? x.depth + 1 : 0 });
        done += len;
        if (done >= inBacking) break;
      }
    }
    if (inBacking < n) push({ length: n - inBacking, hole: true, zero: true, depth: 0 });
  };
  const end = Math.min(offset + length, offset + MAX_STATUS_UNITS * st.g.unitSize);
  await walkMapping(st, tables, offset, end, (kind, guest, n) => {
    if (kind === MAP_DATA || kind === MAP_COMPRESSED) push({ length: n, hole: false, zero: false, depth: 1 });
    else if (kind === MAP_ZERO) push({ length: n, hole: true, zero: true, depth: 1 });
    else return fromBacking(guest, n);
  });
  return out;
}
