/**
 * One /dev/nbdN served by this process: the image's request stack, one socketpair per connection
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
import { resolve as resolvePath } from 'node:path';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { checkName } from '../core/paths.js';
import type { Format } from '../backends/open.js';
import { openStack } from '../daemon/stack.js';
import { NbdExport } from '../nbd/server/export.js';
import { Sidecar } from '../sidecar/sidecar.js';
import { NbdServer } from '../nbd/server/server.js';
import type { NbdSession } from '../nbd/server/session.js';
import { NBD_FLAG } from '../nbd/wire/constants.js';
import { closeFd, socketPair } from '../sys/libc.js';
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

export class KernelDevice {
  private readonly sessions = new Set<NbdSession>();
  private detaching: Promise<void> | null = null;
  private recheck: NodeJS.Timeout | null = null;
  private listener: LinkDeadListener | null = null;
  /** Block status, bitmaps, control and fleecing for backup tools (/run/nbdd/NAME). */
  private sidecar: Sidecar | null = null;
  private doneResolve!: () => void;
  /** Resolves once the device is detached and the image closed. */
  readonly done: Promise<void> = new Promise((r) => (this.doneResolve = r));

  private constructor(
    private readonly control: NbdControl,
    private readonly server: NbdServer,
    private readonly state: DeviceState,
  ) {}

  get index(): number {
    return this.state.index;
  }

  /**
   * CONNECTs a new device, or RECONFIGUREs `opts.index` when it is still connected to the same
   * image under the same name and its daemon is gone. Throws NbddError with advice on failure
   * (module missing, not root, device busy, image missing or locked); nothing stays open then.
   */
  static async attach(opts: AttachOptions): Promise<{ device: KernelDevice; reattached: boolean }> {
    checkName(opts.name);
    requireSysAdmin();
    const control = NbdControl.open();
    let server: NbdServer | undefined;
    let sidecar: Sidecar | undefined;
    let device: KernelDevice | undefined;
    try {
      const prior = opts.index === undefined ? undefined : checkExplicitDevice(control, opts);
      const readOnly = prior ? prior.readOnly : opts.readOnly;
      const stack = await openStack(opts.image, { format: opts.format, readOnly });
      server = new NbdServer();
      const exp = new NbdExport({ name: opts.name, queue: stack.queue, readOnly });
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
      device = new KernelDevice(control, server, state);
      const attaching = device;
      sidecar = await Sidecar.start({
        name: state.name,
        queue: stack.queue,
        stack: stack.layers,
        bitmaps: stack.bitmaps,
        frontendStatus: () => ({ device: devicePath(attaching.index), connections: attaching.sessions.size, configured: state.connections }),
      });
      device.sidecar = sidecar;
      state.sidecar = sidecar.dir;
      const kernelFds = device.openConnections(connections);
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
      const attached = device;
      device.listener = LinkDeadListener.forControl(control, (index) => {
        if (index !== attached.index) return;
        log.warn(`${devicePath(index)}: the kernel reports a dead connection`);
        attached.sidecar?.events.publish('link-dead', { device: devicePath(index) });
        attached.scheduleCheck();
      });
      log.info(`${devicePath(state.index)}: ${prior ? 're-attached' : 'attached'} ${state.image} as '${state.name}' over ${connections} connection(s)`);
      return { device, reattached: !!prior };
    } catch (err) {
      // Closing our ends below must not look like dead connections to replace.
      if (device) device.detaching = Promise.resolve();
      await sidecar?.close().catch(() => undefined);
      await server?.close().catch(() => undefined);
      control.close();
      throw err;
    }
  }

  /** Makes `n` socketpairs, serves our ends, returns the kernel's ends (the caller closes them). */
  private openConnections(n: number): number[] {
    const kernelFds: number[] = [];
    for (let i = 0; i < n; i++) {
      const [kernelEnd, ourEnd] = socketPair();
      kernelFds.push(kernelEnd);
      const session = this.server.serveTransmission(ourEnd, this.state.name);
      this.sessions.add(session);
      void session.closed.then(() => {
        this.sessions.delete(session);
        if (!this.detaching) this.scheduleCheck();
      });
    }
    return kernelFds;
  }

  private scheduleCheck(): void {
    if (this.detaching || this.recheck) return;
    this.recheck = setTimeout(() => {
      this.recheck = null;
      this.checkConnections().catch((err) => log.error(`${devicePath(this.index)}: ${messageOf(err)}`));
    }, RECHECK_MS);
  }

  /** Replaces dead connections, or closes when the device lost its configuration. */
  private async checkConnections(): Promise<void> {
    if (this.detaching) return;
    const status = this.control.status(this.index)[0];
    if (!status?.connected) {
      log.warn(`${devicePath(this.index)} was disconnected from outside nbdd; closing the image`);
      await this.close();
      return;
    }
    const missing = this.state.connections - this.sessions.size;
    if (missing <= 0) return;
    const fds = this.openConnections(missing);
    try {
      this.control.reconfigure({ index: this.index, backendId: this.state.backendId, sockets: fds });
      log.info(`${devicePath(this.index)}: replaced ${missing} dead connection(s)`);
      this.sidecar?.events.publish('reconnected', { device: devicePath(this.index), connections: missing });
    } finally {
      for (const fd of fds) closeFd(fd);
    }
  }

  /** DISCONNECT, wait for the kernel to close the connections, flush and close the image. Idempotent. */
  detach(): Promise<void> {
    this.detaching ??= (async () => {
      if (this.recheck) clearTimeout(this.recheck);
      try {
        this.control.disconnect(this.index);
      } catch (err) {
        if (!(err instanceof NbddError && err.errno === Errno.ENODEV)) throw err;
      }
      await this.close();
    })();
    return this.detaching;
  }

  private async close(): Promise<void> {
    this.detaching ??= Promise.resolve();
    this.listener?.close();
    // The sidecar shares the device's queue; it goes first, then the server closes the queue.
    await this.sidecar?.close();
    await this.server.close();
    this.control.close();
    removeState(this.index);
    log.info(`${devicePath(this.index)}: detached; ${this.state.image} closed`);
    this.doneResolve();
  }
}
