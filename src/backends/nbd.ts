/**
 * The nbd backend: a remote NBD export (nbd://, nbd+unix://) as a Backend, over `NbdClient`.
 *
 * - Capabilities are the server's transmission flags (read-only, flush, FUA, trim, write zeroes,
 *   fast zero, multi-conn) and its block sizes; `readOnly` can only tighten them.
 * - Block status comes from `base:allocation` (hole / zero) and, when the server offers it,
 *   `qemu:allocation-depth` (depth); without either (a server without structured replies) every
 *   byte reads as allocated data, as the core assumes for backends without block status.
 * - With `connections > 1` and a server that sets CAN_MULTI_CONN, requests go round-robin over
 *   several connections; a flush on one covers writes completed on all (the multi-conn promise).
 * - Reconnection (`reconnectDelayMs`, default 30 s): a lost connection is negotiated again in the
 *   background while its requests wait, then they are sent again (src/nbd/client/reconnecting.ts);
 *   a request that waited longer fails with EIO.
 */
import { allData, type Backend, type BackendCaps, type Extent, defaultCaps, type WriteOptions, type ZeroOptions } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import type { StatusExtent } from '../core/meta-context.js';
import { NbdClient } from '../nbd/client/client.js';
import { ReconnectingClient, type RemoteEventType } from '../nbd/client/reconnecting.js';
import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH } from '../nbd/wire/contexts.js';
import { parseNbdUri } from '../nbd/uri.js';
import { clientTlsOptions } from '../nbd/tls.js';
import { NBD_FLAG, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/wire/constants.js';
import { Slots } from '../core/slots.js';
import { DEFAULT_MAX_IN_FLIGHT, MAX_NBD_CONNECTIONS, type RemoteLink } from './remote.js';


/** How long requests wait for a lost connection by default (qemu's reconnect-delay is off by default; nbd-client's is not configurable). */
export const DEFAULT_RECONNECT_DELAY_MS = 30_000;

export interface OpenNbdOptions {
  readOnly?: boolean;
  /** Connections to open when the server allows multi-conn (default 1, at most 16). */
  connections?: number;
  /** How long a request waits for a lost connection to come back before it fails with EIO (ms; default 30 s; 0: at once). */
  reconnectDelayMs?: number;
  /** A request without a reply for this long drops its connection and is sent again on a new one (ms; default 0: no limit). */
  requestTimeoutMs?: number;
  /** Most requests in flight to the server, over all connections (default 128); more wait their turn. */
  maxInFlight?: number;
  /** Contexts to select besides base:allocation and qemu:allocation-depth (e.g. a dirty bitmap). */
  extraContexts?: string[];
  /** Also fetch the list of contexts the export offers (`primary.info.offeredContexts`). */
  listContexts?: boolean;
}

export class NbdBackend implements Backend, RemoteLink {
  readonly kind = 'nbd';
  /** The URI the backend was opened with (set by openNbd). */
  remoteUri = '';
  private readonly remoteListeners: ((type: RemoteEventType, data: Record<string, unknown>) => void)[] = [];
  readonly size: number;
  readonly caps: BackendCaps;
  private next = 0;
  private closing: Promise<void> | null = null;
  /** At most `maxInFlight` requests at the server; the rest wait, oldest first. */
  private readonly slots: Slots;

  /** The first connection: its negotiated info (contexts, flags) is the backend's. */
  get primary(): NbdClient {
    return this.clients[0]!.client;
  }

  /** Takes ownership of `clients` (all to the same export; the first one's info is used). */
  constructor(
    private readonly clients: ReconnectingClient[],
    readOnly: boolean,
    maxInFlight = DEFAULT_MAX_IN_FLIGHT,
  ) {
    this.slots = new Slots(Math.max(1, maxInFlight));
    const c = clients[0]!.first;
    const i = c.info;
    this.size = i.size;
    this.caps = defaultCaps({
      readOnly: readOnly || c.has(NBD_FLAG.READ_ONLY),
      flush: c.has(NBD_FLAG.SEND_FLUSH),
      fua: c.has(NBD_FLAG.SEND_FUA),
      trim: c.has(NBD_FLAG.SEND_TRIM),
      writeZeroes: c.has(NBD_FLAG.SEND_WRITE_ZEROES),
      fastZero: c.has(NBD_FLAG.SEND_FAST_ZERO),
      multiConn: c.has(NBD_FLAG.CAN_MULTI_CONN),
      blockStatus: i.contexts.has(BASE_ALLOCATION),
      minBlockSize: i.minBlockSize,
      preferredBlockSize: i.preferredBlockSize,
      maxTransfer: i.maxPayload,
    });
  }

  /** The client of the first connection (negotiated export info, flags, contexts). */
  get client(): NbdClient {
    return this.clients[0]!.client;
  }

  /** Times a lost connection came back, over all connections. */
  get reconnects(): number {
    return this.clients.reduce((n, c) => n + c.reconnects, 0);
  }

  onRemoteEvent(listener: (type: RemoteEventType, data: Record<string, unknown>) => void): void {
    this.remoteListeners.push(listener);
  }

  /** Where the connections report losses and returns (openNbd wires it). */
  readonly remoteEvent = (type: RemoteEventType, data: Record<string, unknown>): void => {
    for (const l of this.remoteListeners) l(type, data);
  };

  /** The remote's state, worst connection first: connected, reconnecting, failed or closed. */
  get remoteState(): string {
    const states = this.clients.map((c) => c.state);
    return (['failed', 'reconnecting', 'closed'] as const).find((s) => states.includes(s)) ?? 'connected';
  }

  get connections(): number {
    return this.clients.length;
  }

  /** Requests in flight to the server now (at most `maxInFlight`). */
  get requestsInFlight(): number {
    return this.slots.active;
  }

  /**
   * Runs `op` on the next connection (round robin; `first` pins it to the first one) once one of
   * the `maxInFlight` slots is free.
   */
  private send<T>(op: (c: NbdClient) => Promise<T>, first = false): Promise<T> {
    return this.slots.run(() => {
      let c = this.clients[0]!;
      if (!first) {
        c = this.clients[this.next]!;
        this.next = (this.next + 1) % this.clients.length;
      }
      return c.run(op);
    });
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.send((c) => c.read(offset, length));
  }

  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const fua = !!options?.fua && this.caps.fua;
    return this.send((c) => c.write(offset, data, { fua }));
  }

  async flush(): Promise<void> {
    if (this.caps.flush) await this.send((c) => c.flush(), true);
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    const fua = !!options?.fua && this.caps.fua;
    return this.send((c) => c.trim(offset, length, { fua }));
  }

  /** Fails with ENOTSUP for `fastZero` when the server cannot promise it (SEND_FAST_ZERO unset). */
  writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    if (options.fastZero && !this.caps.fastZero) {
      return Promise.reject(new NbddError(Errno.ENOTSUP, 'the NBD server does not support fast zeroing'));
    }
    const flags = { fua: !!options.fua && this.caps.fua, noHole: options.noHole, fastZero: options.fastZero };
    return this.send((c) => c.writeZeroes(offset, length, flags));
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.client.has(NBD_FLAG.SEND_CACHE)) await this.send((c) => c.cache(offset, length));
  }

  /**
   * Extents from `offset`, clipped to `length`: base:allocation's hole / zero, and the depth from
   * qemu:allocation-depth when selected (else 0 for holes, 1 for data). Where the two contexts'
   * boundaries differ, extents are split at both.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.client.info.contexts.has(BASE_ALLOCATION)) return allData(length);
    const status = await this.send((c) => c.blockStatus(offset, length));
    return combineStatus(status.get(BASE_ALLOCATION)!, status.get(QEMU_ALLOCATION_DEPTH), length);
  }

  /** Flushes if writable, sends NBD_CMD_DISC on every connection. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        if (!this.caps.readOnly) await this.flush();
      } finally {
        await Promise.all(this.clients.map((c) => c.close()));
      }
    })();
    return this.closing;
  }
}

/**
 * Merges base:allocation extents with (optional) allocation-depth extents into Extents, covering
 * the shorter of the two and at most `limit` bytes. Pure.
 */
export function combineStatus(allocation: StatusExtent[], depth: StatusExtent[] | undefined, limit: number): Extent[] {
  const out: Extent[] = [];
  let ai = 0;
  let di = 0;
  let aLeft = allocation[0]?.length ?? 0;
  let dLeft = depth ? (depth[0]?.length ?? 0) : Infinity;
  let covered = 0;
  while (covered < limit && ai < allocation.length && (!depth || di < depth.length)) {
    const a = allocation[ai]!.flags;
    const hole = (a & NBD_STATE_HOLE) !== 0;
    const d = depth ? depth[di]!.flags : hole ? 0 : 1;
    const n = Math.min(aLeft, dLeft, limit - covered);
    const last = out[out.length - 1];
    const zero = (a & NBD_STATE_ZERO) !== 0;
    if (last && last.hole === hole && last.zero === zero && last.depth === d) last.length += n;
    else out.push({ length: n, hole, zero, depth: d });
    covered += n;
    aLeft -= n;
    dLeft -= n;
    if (aLeft === 0) aLeft = allocation[++ai]?.length ?? 0;
    if (depth && dLeft === 0) dLeft = depth[++di]?.length ?? 0;
  }
  return out;
}

/**
 * Opens an NBD URI as a backend: parses it (see `src/nbd/uri.ts`), connects, selects
 * base:allocation and qemu:allocation-depth, and with `connections > 1` opens more connections
 * when the server allows multi-conn. Throws NbddError (EINVAL bad URI, ENOTSUP TLS, ENOENT no
 * such export, ECONNREFUSED, EPROTO, ...).
 */
export async function openNbd(uri: string, options: OpenNbdOptions = {}): Promise<NbdBackend> {
  const { transport, exportName, tls } = parseNbdUri(uri);
  const tlsOptions = tls ? clientTlsOptions(tls, transport.kind === 'tcp' ? transport.host : null) : undefined;
  const wanted = Math.max(1, Math.min(options.connections ?? 1, MAX_NBD_CONNECTIONS));
  const metaContexts = [...new Set([BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, ...(options.extraContexts ?? [])])];
  const connect = (): Promise<NbdClient> => NbdClient.connect(transport, { exportName, metaContexts, listMetaContexts: options.listContexts, tls: tlsOptions });
  const first = await connect();
  const clients = [first];
  if (wanted > 1 && first.has(NBD_FLAG.CAN_MULTI_CONN)) {
    const more = await Promise.allSettled(Array.from({ length: wanted - 1 }, connect));
    for (const m of more) if (m.status === 'fulfilled') clients.push(m.value);
    const failed = more.find((m) => m.status === 'rejected');
    if (failed) {
      await Promise.all(clients.map((c) => c.close()));
      throw (failed as PromiseRejectedResult).reason;
    }
  }
  let backend: NbdBackend | null = null;
  const reconnect = { delayMs: options.reconnectDelayMs ?? DEFAULT_RECONNECT_DELAY_MS, requestTimeoutMs: options.requestTimeoutMs, connect, peer: uri, onEvent: (type: RemoteEventType, data: Record<string, unknown>) => backend?.remoteEvent(type, data) };
  backend = new NbdBackend(
    clients.map((c) => new ReconnectingClient(c, reconnect)),
    !!options.readOnly,
    options.maxInFlight,
  );
  backend.remoteUri = uri;
  return backend;
}
