/**
 * An export: a named backend stack behind one BlockQueue, as the NBD server offers it.
 * Holds what negotiation needs (size, transmission flags, block sizes) and the metadata contexts.
 */
import type { Extent } from '../../core/backend.js';
import type { MetaContext, StatusExtent } from '../../core/meta-context.js';
import type { BlockQueue } from '../../core/queue.js';
import { LIMITS, NBD_FLAG } from '../wire/constants.js';
import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, allocationFlags, depthOf } from '../wire/contexts.js';

export interface ExportOptions {
  name: string;
  description?: string;
  queue: BlockQueue;
  /** Refuse writes even if the backend could take them. */
  readOnly?: boolean;
  /** More contexts (e.g. dirty bitmaps); asked again at every negotiation, so it may change. */
  extraContexts?: () => MetaContext[];
  /**
   * The server closes the queue when it closes (default true). A device runtime passes false:
   * the queue is the device's, shared with the sidecar, and closed last by the runtime.
   */
  ownsQueue?: boolean;
}

export class NbdExport {
  readonly name: string;
  readonly description: string;
  readonly queue: BlockQueue;
  readonly readOnly: boolean;
  readonly ownsQueue: boolean;
  private readonly extraContexts: () => MetaContext[];
  private readonly baseContexts: MetaContext[];

  constructor(options: ExportOptions) {
    this.name = options.name;
    this.description = options.description ?? '';
    this.queue = options.queue;
    this.readOnly = !!options.readOnly || options.queue.caps.readOnly;
    this.extraContexts = options.extraContexts ?? (() => []);
    this.ownsQueue = options.ownsQueue ?? true;
    const queue = this.queue;
    this.baseContexts = [
      { name: BASE_ALLOCATION, extents: async (o, l) => mapExtents(await queue.blockStatus(o, l), allocationFlags) },
      { name: QEMU_ALLOCATION_DEPTH, extents: async (o, l) => mapExtents(await queue.blockStatus(o, l), depthOf) },
    ];
  }

  get size(): number {
    return this.queue.size;
  }

  get minBlockSize(): number {
    return this.queue.caps.minBlockSize;
  }

  get preferredBlockSize(): number {
    return Math.max(this.queue.caps.preferredBlockSize, this.minBlockSize, 512);
  }

  get maxPayload(): number {
    return Math.min(this.queue.caps.maxTransfer, LIMITS.maxPayload);
  }

  /**
   * Transmission flags. `structured` adds DF (only meaningful with structured replies). Write-type
   * flags are always offered on a writable export: the queue emulates what the backend lacks.
   */
  transmissionFlags(structured: boolean): number {
    const caps = this.queue.caps;
    let flags = NBD_FLAG.HAS_FLAGS | NBD_FLAG.SEND_FLUSH | NBD_FLAG.SEND_FUA | NBD_FLAG.SEND_CACHE;
    if (this.readOnly) flags |= NBD_FLAG.READ_ONLY;
    else {
      flags |= NBD_FLAG.SEND_WRITE_ZEROES | NBD_FLAG.SEND_FAST_ZERO;
      if (caps.trim) flags |= NBD_FLAG.SEND_TRIM;
    }
    if (caps.multiConn) flags |= NBD_FLAG.CAN_MULTI_CONN;
    if (structured) flags |= NBD_FLAG.SEND_DF;
    return flags;
  }

  /** Every context this export offers now. */
  contexts(): MetaContext[] {
    return [...this.baseContexts, ...this.extraContexts()];
  }
}

/** Backend extents to context extents, merging neighbours whose flags are equal. */
function mapExtents(extents: Extent[], flagsOf: (e: Extent) => number): StatusExtent[] {
  const out: StatusExtent[] = [];
  for (const e of extents) {
    const flags = flagsOf(e);
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += e.length;
    else out.push({ length: e.length, flags });
  }
  return out;
}

/**
 * Which of `contexts` a query selects: exact names; with `list`, also the wildcards `base:`,
 * `qemu:` and `qemu:dirty-bitmap:` (a namespace or a prefix ending in ':').
 */
export function matchContexts(contexts: MetaContext[], query: string, list: boolean): MetaContext[] {
  if (list && query.endsWith(':')) return contexts.filter((c) => c.name.startsWith(query));
  return contexts.filter((c) => c.name === query);
}
