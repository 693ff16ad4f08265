/**
 * One /dev/nbdN served by this process, as a frontend of the device runtime (src/runtime/device.ts,
 * which owns the stack and the sidecar): one socketpair per connection
 * (our end served by the NBD server's transmission-phase sessions, the other end handed to the
 * kernel), the netlink CONNECT or RECONFIGURE that binds them, and what keeps the device alive:
 *
 * - when a connection dies while we are not detaching (the kernel timed a request out, or a
 *   session failed), the kernel keeps the device and holds I/O for the dead-connection timeout;
 *   we answer with fresh socketpairs through RECONFIGURE (LINK_DEAD notifications and our own
 *   session closes both trigger the check);
 * - when the device was disconnected from outside (STATUS says it has no configuration), we close;
 * - `detach()` sends DISCONNECT, lets the sessions finish, flushes and closes the image.
 *
 * A new daemon takes over a device whose daemon died (`reattach`): same image, same backend
 * identifier, RECONFIGURE with fresh sockets; I/O the kernel held resumes.
 */
import type { RemoteOptions } from '../backends/open.js';
import { resolve as resolvePath } from 'node:path';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { checkName } from '../core/paths.js';
import type { Format } from '../backends/open.js';
import { NbdExport } from '../nbd/server/export.js';
import { NbdServer } from '../nbd/server/server.js';
import type { MetricsListen } from '../runtime/metrics.js';
import { scanPartitions } from './partitions.js';
import { DeviceRuntime, type Frontend, type FrontendContext } from '../runtime/device.js';
import type { NbdSession } from '../nbd/server/session.js';
import { NBD_FLAG } from '../nbd/wire/constants.js';
import { closeFd, setUnixSendBuffer, socketPair } from '../sys/libc.js';
import { UNIX_SEND_BUFFER } from '../nbd/read-slab.js';
import { LinkDeadListener, NbdControl, devicePath, requireSysAdmin } from './nbd-control.js';
import { loadState, processAlive, removeState, saveState, type DeviceState } from './registry.js';
import { readSysfs } from './sysfs.js';

const log = logger('kernel');

export interface AttachOptions {
  /** A file path, block device, `memory:SIZE`, or anything `openImage` takes. */
  image: string;
  name: string;
  /** Ask for /dev/nbdN; omitted = the kernel picks. A connected device owned by `name` is re-attached. */
  index?: number;
  format: Format;
  readOnly: boolean;
  connections: number;
  timeoutS: number;
  deadConnTimeoutS: number;
  /** NBD URI images and remote backing files: reconnect, timeouts, in-flight bound, whether to follow remote backing. */
  remote?: RemoteOptions;
  /** Serve Prometheus metrics here (src/runtime/metrics.ts). */
  metrics?: MetricsListen;
  /** Most dirty bitmaps the device keeps (default DEFAULT_BITMAP_LIMITS). */
  maxBitmaps?: number;
  /** Have the kernel read the partition table before the device is reported ready (default true). */
  partitions?: boolean;
}

/** Device block size we announce: 512-byte sectors unless the image needs more. */
const SECTOR = 512;
/** Kernel's largest logical block size on 4 KiB-page systems. */
const MAX_BLOCK_SIZE = 4096;
/** Delay before checking the device after a connection closed (lets the kernel mark it dead). */
const RECHECK_MS = 200;

/** The backend identifier the kernel stores for a device named `name`. */
export function backendIdFor(name: string): string {
  return `nbdd:${name}`;
}


/** Absolute path for files; other specs (memory:, nbd URIs) as given. */
export function canonicalImage(image: string): string {
  return /^[a-z][a-z0-9+.-]*:/i.test(image) ? image : resolvePath(image);
}

/** Decides whether an explicit device is free or ours to re-attach; returns the prior state to reuse. */
function checkExplicitDevice(control: NbdControl, opts: AttachOptions): DeviceState | undefined {
  const index = opts.index!;
  const status = control.status(index)[0];
  if (!status?.connected) return undefined;
  const dev = devicePath(index);
  const prior = loadState(index);
  const backend = readSysfs(index)?.backend ?? '';
  if (!prior || backend !== prior.backendId) {
    throw new NbddError(Errno.EBUSY, `${dev} is in use (connected${backend ? ` to backend '${backend}'` : ''}, not by an nbdd device this machine knows)`);
  }
  if (prior.pid !== process.pid && processAlive(prior.pid)) {
    throw new NbddError(Errno.EBUSY, `${dev} is in use: nbdd pid ${prior.pid} serves '${prior.name}' (${prior.image})`);
  }
  if (prior.image !== canonicalImage(opts.image)) {
    throw new NbddError(Errno.EBUSY, `${dev} belongs to ${prior.image}, not ${canonicalImage(opts.image)}; re-attach needs the same image`);
  }
  return prior;
}

/**
 * The kernel NBD driver as a frontend. `prepare` runs before the stack opens (it decides, from a
 * device being re-attached, whether the image opens read-only); `start` CONNECTs or RECONFIGUREs;
 * `stop` DISCONNECTs (unless the device is already gone), lets the sessions finish, and forgets
 * the device. The queue is the runtime's, closed after this.
 */
export class KernelFrontend implements Frontend {
  readonly kind = 'kernel-nbd';
  private readonly sessions = new Set<NbdSession>();
  private server: NbdServer | null = null;
  private state: DeviceState | null = null;
  private stopping: Promise<void> | null = null;
  private disconnected = false;
  private recheck: NodeJS.Timeout | null = null;
  private listener: LinkDeadListener | null = null;
  private ctx: FrontendContext | null = null;

  private constructor(
    private readonly control: NbdControl,
    private readonly opts: AttachOptions,
    /** The state of the device being re-attached, if any. */
    private readonly prior: DeviceState | undefined,
  ) {}

  /** Checks the name, privileges and an explicit device (free, or ours to re-attach). */
  static prepare(opts: AttachOptions): KernelFrontend {
    checkName(opts.name);
    requireSysAdmin();
    const control = NbdControl.open();
    try {
      const prior = opts.index === undefined ? undefined : checkExplicitDevice(control, opts);
      return new KernelFrontend(control, opts, prior);
    } catch (err) {
      control.close();
      throw err;
    }
  }

  get reattached(): boolean {
    return !!this.prior;
  }

  /** A re-attached device keeps the read-only setting it was made with. */
  get readOnly(): boolean {
    return this.prior ? this.prior.readOnly : this.opts.readOnly;
  }

  get index(): number {
    return this.state?.index ?? -1;
  }

  async start(ctx: FrontendContext): Promise<void> {
    const { opts, prior, control } = this;
    const stack = ctx.stack;
    this.ctx = ctx;
    const server = new NbdServer();
    this.server = server;
    try {
      const exp = new NbdExport({ name: opts.name, queue: stack.queue, readOnly: this.readOnly, ownsQueue: false });
      server.addExport(exp);
      const serverFlags = exp.transmissionFlags(false);
      const connections = prior ? prior.connections : opts.connections;
      if (connections > 1 && !(serverFlags & NBD_FLAG.CAN_MULTI_CONN)) {
        throw new NbddError(Errno.EINVAL, `${stack.image.kind} images cannot be served over ${connections} connections (no multi-conn); use --connections 1`);
      }
      if (prior && prior.sizeBytes !== exp.size) {
        throw new NbddError(Errno.EINVAL, `${opts.image} is now ${exp.size} bytes, the device has ${prior.sizeBytes}; cannot re-attach`);
      }
      const state: DeviceState = prior
        ? { ...prior, pid: process.pid, reattachedAt: new Date().toISOString() }
        : {
            index: -1,
            name: opts.name,
            image: canonicalImage(opts.image),
            format: stack.image.kind,
            backendId: backendIdFor(opts.name),
            pid: process.pid,
            connections,
            readOnly: !!(serverFlags & NBD_FLAG.READ_ONLY),
            sizeBytes: exp.size,
            blockSize: Math.min(MAX_BLOCK_SIZE, Math.max(SECTOR, exp.minBlockSize)),
            serverFlags,
            timeoutS: opts.timeoutS,
            deadConnTimeoutS: opts.deadConnTimeoutS,
            attachedAt: new Date().toISOString(),
          };
      if (ctx.sidecarDir) state.sidecar = ctx.sidecarDir;
      this.state = state;
      const kernelFds = this.openConnections(connections);
      try {
        if (prior) {
          control.reconfigure({ index: prior.index, backendId: prior.backendId, sockets: kernelFds, timeoutS: prior.timeoutS, deadConnTimeoutS: prior.deadConnTimeoutS });
        } else {
          state.index = control.connect({
            index: opts.index,
            sizeBytes: state.sizeBytes,
            blockSize: state.blockSize,
            serverFlags,
            timeoutS: state.timeoutS,
            deadConnTimeoutS: state.deadConnTimeoutS,
            backendId: state.backendId,
            sockets: kernelFds,
          });
        }
      } finally {
        // The kernel took its own references during the request; ours are no longer needed.
        for (const fd of kernelFds) closeFd(fd);
      }
      saveState(state);
      this.listener = LinkDeadListener.forControl(control, (index) => {
        if (index !== this.index) return;
        log.warn(`${devicePath(index)}: the kernel reports a dead connection`);
        ctx.publish('link-dead', { device: devicePath(index) });
        this.scheduleCheck();
      });
      log.info(`${devicePath(state.index)}: ${prior ? 're-attached' : 'attached'} ${state.image} as '${state.name}' over ${connections} connection(s)`);
      // A re-attached device has its partitions (perhaps mounted: a rescan would fail with EBUSY).
      if (!prior && opts.partitions !== false) await scanPartitions(`nbd${state.index}`);
    } catch (err) {
      // Closing our ends below must not look like dead connections to replace.
      this.stopping = Promise.resolve();
      await server.close().catch(() => undefined);
      control.close();
      throw err;
    }
  }

  status(): Record<string, unknown> {
    return { device: devicePath(this.index), connections: this.sessions.size, configured: this.state?.connections ?? 0 };
  }

  /** DISCONNECT; errors (other than the device being gone already) are the caller's. */
  disconnect(): void {
    if (this.disconnected || this.index < 0) return;
    try {
      this.control.disconnect(this.index);
    } catch (err) {
      if (!(err instanceof NbddError && err.errno === Errno.ENODEV)) throw err;
    }
    this.disconnected = true;
  }

  /** DISCONNECT if still connected, wait for the kernel to close the connections, forget the device. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (this.recheck) clearTimeout(this.recheck);
      this.listener?.close();
      try {
        this.disconnect();
      } finally {
        await this.server?.close();
        this.control.close();
        if (this.index >= 0) {
          removeState(this.index);
          log.info(`${devicePath(this.index)}: detached; ${this.state!.image} closed`);
        }
      }
    })();
    return this.stopping;
  }

  /** Makes `n` socketpairs, serves our ends, returns the kernel's ends (the caller closes them). */
  private openConnections(n: number): number[] {
    const kernelFds: number[] = [];
    for (let i = 0; i < n; i++) {
      const [kernelEnd, ourEnd] = socketPair();
      // The driver's end gets the larger send buffer too: with the default 208 KiB it stalled in the
      // middle of each 1 MiB WRITE (docs/performance.md, "Spliced writes").
      setUnixSendBuffer(kernelEnd, UNIX_SEND_BUFFER);
      kernelFds.push(kernelEnd);
      const session = this.server!.serveTransmission(ourEnd, this.opts.name);
      this.sessions.add(session);
      void session.closed.then(() => {
        this.sessions.delete(session);
        if (!this.stopping) this.scheduleCheck();
      });
    }
    return kernelFds;
  }

  private scheduleCheck(): void {
    if (this.stopping || this.recheck) return;
    this.recheck = setTimeout(() => {
      this.recheck = null;
      this.checkConnections().catch((err) => log.error(`${devicePath(this.index)}: ${messageOf(err)}`));
    }, RECHECK_MS);
  }

  /** Replaces dead connections, or ends the runtime when the device lost its configuration. */
  private async checkConnections(): Promise<void> {
    if (this.stopping) return;
    const status = this.control.status(this.index)[0];
    if (!status?.connected) {
      log.warn(`${devicePath(this.index)} was disconnected from outside nbdd; closing the image`);
      this.disconnected = true;
      this.ctx!.ended();
      return;
    }
    const missing = this.state!.connections - this.sessions.size;
    if (missing <= 0) return;
    const fds = this.openConnections(missing);
    try {
      this.control.reconfigure({ index: this.index, backendId: this.state!.backendId, sockets: fds });
      log.info(`${devicePath(this.index)}: replaced ${missing} dead connection(s)`);
      this.ctx!.publish('reconnected', { device: devicePath(this.index), connections: missing });
    } finally {
      for (const fd of fds) closeFd(fd);
    }
  }
}

/** An attached /dev/nbdN: the kernel frontend in a device runtime with its sidecar. */
export class KernelDevice {
  private constructor(
    private readonly runtime: DeviceRuntime,
    private readonly frontend: KernelFrontend,
  ) {}

  get index(): number {
    return this.frontend.index;
  }

  /** Where the metrics are served, when they are. */
  get metricsUrl(): string | null {
    return this.runtime.metricsUrl;
  }

  /** Resolves once the device is detached and the image closed. */
  get done(): Promise<void> {
    return this.runtime.done;
  }

  /**
   * CONNECTs a new device, or RECONFIGUREs `opts.index` when it is still connected to the same
   * image under the same name and its daemon is gone. Throws NbddError with advice on failure
   * (module missing, not root, device busy, image missing or locked); nothing stays open then.
   */
  static async attach(opts: AttachOptions): Promise<{ device: KernelDevice; reattached: boolean }> {
    const frontend = KernelFrontend.prepare(opts);
    let runtime: DeviceRuntime;
    try {
      runtime = await DeviceRuntime.start({
        image: opts.image,
        stack: { format: opts.format, readOnly: frontend.readOnly, ...opts.remote, connections: opts.connections, bitmapLimits: { maxBitmaps: opts.maxBitmaps } },
        frontend,
        sidecar: { name: opts.name },
        metrics: opts.metrics && { listen: opts.metrics, name: opts.name },
      });
    } catch (err) {
      await frontend.stop().catch(() => undefined);
      throw err;
    }
    return { device: new KernelDevice(runtime, frontend), reattached: frontend.reattached };
  }

  /** DISCONNECT (its failure is thrown), then the runtime's stop: sessions finish, the image flushes and closes. */
  async detach(): Promise<void> {
    this.frontend.disconnect();
    await this.runtime.stop();
  }
}
