/**
 * Transmission-phase decisions that need no socket: whether a request may proceed (the spec's
 * error otherwise), and how a read is answered — one data chunk, or sparsely with holes as
 * OFFSET_HOLE chunks. NbdSession applies them; tests call them directly.
 */
import type { BackendCaps, Extent } from '../../core/backend.js';
import { NBD_CMD, NBD_CMD_FLAG, NBD_ERR } from '../wire/constants.js';
import { OFFSET_UNREPRESENTABLE, type RequestHeader } from '../wire/transmission.js';

/** Reads at least this long, without DF, are answered sparsely (holes as OFFSET_HOLE chunks). */
export const SPARSE_READ_MIN = 64 * 1024;

/** Flags valid per command (before checking what the export negotiated). */
const VALID_FLAGS: Record<number, number> = {
  [NBD_CMD.READ]: NBD_CMD_FLAG.FUA | NBD_CMD_FLAG.DF,
  [NBD_CMD.WRITE]: NBD_CMD_FLAG.FUA,
  [NBD_CMD.DISC]: 0,
  [NBD_CMD.FLUSH]: NBD_CMD_FLAG.FUA,
  [NBD_CMD.TRIM]: NBD_CMD_FLAG.FUA,
  [NBD_CMD.CACHE]: NBD_CMD_FLAG.FUA,
  [NBD_CMD.WRITE_ZEROES]: NBD_CMD_FLAG.FUA | NBD_CMD_FLAG.NO_HOLE | NBD_CMD_FLAG.FAST_ZERO,
  [NBD_CMD.BLOCK_STATUS]: NBD_CMD_FLAG.FUA | NBD_CMD_FLAG.REQ_ONE,
};

/** What validation needs to know about the export and the connection. */
export interface RequestContext {
  size: number;
  readOnly: boolean;
  minBlockSize: number;
  maxPayload: number;
  /** Structured replies were negotiated. */
  structured: boolean;
  /** Meta contexts selected for this export. */
  contexts: number;
}

export function isWriteCommand(type: number): boolean {
  return type === NBD_CMD.WRITE || type === NBD_CMD.TRIM || type === NBD_CMD.WRITE_ZEROES;
}

/** Checks a request; an NBD error value, or 0 when it may proceed. */
export function validateRequest(h: RequestHeader, c: RequestContext): number {
  const valid = VALID_FLAGS[h.type];
  if (valid === undefined) return NBD_ERR.EINVAL;
  if ((h.flags & ~valid) !== 0) return NBD_ERR.EINVAL;
  if (h.flags & NBD_CMD_FLAG.DF && !c.structured) return NBD_ERR.EINVAL;
  if (h.offset >= OFFSET_UNREPRESENTABLE) return NBD_ERR.EINVAL;
  const isWrite = isWriteCommand(h.type);
  if (isWrite && c.readOnly) return NBD_ERR.EPERM;
  if (h.type === NBD_CMD.FLUSH || h.type === NBD_CMD.DISC) return 0;
  if (h.offset + h.length > c.size) return isWrite ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL;
  const min = c.minBlockSize;
  if (min > 1 && (h.offset % min !== 0 || h.length % min !== 0)) return NBD_ERR.EINVAL;
  if (h.type === NBD_CMD.READ && h.length > c.maxPayload) {
    return h.flags & NBD_CMD_FLAG.DF ? NBD_ERR.EOVERFLOW : NBD_ERR.EINVAL;
  }
  if (h.type === NBD_CMD.BLOCK_STATUS && (h.length === 0 || c.contexts === 0)) return NBD_ERR.EINVAL;
  return 0;
}

/** Whether a READ may be answered sparsely: structured, no DF, long enough, and the backend can tell holes. */
export function readsSparsely(h: RequestHeader, structured: boolean, caps: Pick<BackendCaps, 'blockStatus'>): boolean {
  return h.length >= SPARSE_READ_MIN && structured && !(h.flags & NBD_CMD_FLAG.DF) && caps.blockStatus;
}

/** One chunk of a sparse read: data to read, or a hole (reads as zeroes, sent as OFFSET_HOLE). */
export interface ReadPart {
  offset: number;
  length: number;
  hole: boolean;
}

/**
 * The chunks answering a sparse read of `[offset, offset+length)` given its block status (which
 * may run past the end): one part per extent, zero extents as holes.
 */
export function planSparseRead(extents: Extent[], offset: number, length: number): ReadPart[] {
  const parts: ReadPart[] = [];
  let at = offset;
  for (const e of clip(extents, length)) {
    parts.push({ offset: at, length: e.length, hole: e.zero });
    at += e.length;
  }
  return parts;
}

/** Keeps extents within `length` bytes (and at most `max` of them); extents are consecutive. */
export function clip<T extends { length: number }>(extents: T[], length: number, max = Infinity): T[] {
  const out: T[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered >= length || out.length >= max) break;
    const take = Math.min(e.length, length - covered);
    out.push(take === e.length ? e : { ...e, length: take });
    covered += take;
  }
  return out;
}
