/**
 * One /dev/ublkbN served by this process, as a frontend of the device runtime
 * (src/runtime/device.ts owns the stack and the sidecar):
 *
 *   new device: GET_FEATURES → ADD_DEV (USER_RECOVERY | REISSUE) → SET_PARAMS → open /dev/ublkcN
 *               → one queue thread per hardware queue, each FETCHes every tag → START_DEV
 *   recovery:   the device's daemon died (the kernel keeps the disk, QUIESCED, holding I/O):
 *               START_USER_RECOVERY → open /dev/ublkcN → queue threads FETCH → END_USER_RECOVERY;
 *               the kernel re-issues what the dead daemon had in flight
 *   stop:       STOP_DEV while the queues keep answering (del_gendisk waits for in-flight
 *               requests, a udev prober's reads among them), then every FETCH ends with ABORT and
 *               the threads exit → close /dev/ublkcN → DEL_DEV → forget the device
 *
 * Anything that fails after ADD_DEV undoes it (no half-created device stays behind).
 */
import type { RemoteOptions } from '../backends/open.js';
import { closeSync, existsSync, openSync, readFileSync, readdirSync } from 'node:fs';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { checkName } from '../core/paths.js';
import type { Format } from '../backends/open.js';
import type { MetricsListen } from '../runtime/metrics.js';
import { DeviceRuntime, type Frontend, type FrontendContext } from '../runtime/device.js';
import { canonicalImage } from '../kernel/device.js';
import { requireSysAdmin } from '../kernel/nbd-control.js';
import { loadState, processAlive, removeState, saveState, type DeviceState } from '../kernel/registry.js';
import { ublkAddon } from './addon.js';
import * as ctl from './control.js';
import { UblkQueue, type QueueMode } from './queue.js';
import { UBLK_F, UBLK_STATE, UBLK_STATE_NAME, ublkCharPath, ublkDevicePath, type DeviceParams, type DevInfo } from './uapi.js';

const log = logger('ublk');

export interface UblkAttachOptions {
  image: string;
  name: string;
  /** Ask for /dev/ublkbN; omitted = the kernel picks. A quiesced device of this image is recovered. */
  id?: number;
  format: Format;
  readOnly: boolean;
  queues: number;
  depth: number;
  /** NBD URI images and remote backing files: reconnect, timeouts, in-flight bound, whether to follow remote backing. */
  remote?: RemoteOptions;
  /** Serve Prometheus metrics here (src/runtime/metrics.ts). */
  metrics?: MetricsListen;
  /** Most dirty bitmaps the device keeps (default DEFAULT_BITMAP_LIMITS). */
  maxBitmaps?: number;
  /** Where each queue's io_uring lives (default: on the event loop). */
  queueMode?: QueueMode;
}

/** Per-tag buffer, and so the largest request (max_sectors = 1024). */
export const MAX_IO_BYTES = 512 * 1024;
/** Largest discard / write-zeroes request the kernel sends, in sectors (1 GiB). */
const MAX_DISCARD_SECTORS = 2 * 1024 * 1024;
/** How long START_USER_RECOVERY may answer EBUSY (the old daemon's char device not yet released). */
const RECOVERY_WAIT_MS = 15_000;
/** How long the queue threads may take to see every FETCH aborted after STOP_DEV. */
const QUEUE_EXIT_MS = 10_000;

function shiftOf(bytes: number): number {
  return Math.max(9, Math.min(12, Math.round(Math.log2(Math.max(512, bytes)))));
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Decides, for an explicit id, whether the device is free, ours to recover, or busy. */
async function checkExplicit(opts: UblkAttachOptions): Promise<{ prior?: DeviceState; info?: DevInfo }> {
  const id = opts.id!;
  const info = await ctl.findDeviceInfo(id);
  if (!info) return {};
  const dev = ublkDevicePath(id);
  const prior = loadState(id, 'ublk');
  if (info.state === UBLK_STATE.LIVE && info.ublksrvPid > 0 && processAlive(info.ublksrvPid)) {
    throw new NbddError(Errno.EBUSY, `${dev} is in use: served by pid ${info.ublksrvPid}${prior ? ` ('${prior.name}', ${prior.image})` : ''}`);
  }
  if (!prior) throw new NbddError(Errno.EBUSY, `${dev} exists and is not a device this machine's nbdd knows (state ${UBLK_STATE_NAME[info.state] ?? info.state})`);
  if (prior.image !== canonicalImage(opts.image)) {
    throw new NbddError(Errno.EBUSY, `${dev} belongs to ${prior.image}, not ${canonicalImage(opts.image)}; recovery needs the same image`);
  }
  if ((info.flags & UBLK_F.USER_RECOVERY) === 0n) throw new NbddError(Errno.EBUSY, `${dev} was made without user recovery; it cannot be taken over`);
  return { prior, info };
}

export class UblkFrontend implements Frontend {
  readonly kind = 'ublk';
  private queues: UblkQueue[] = [];
  private cdevFd = -1;
  private state: DeviceState | null = null;
  private added = false;
  private started = false;
  private stopping: Promise<void> | null = null;
  private info: DevInfo | null = null;

  private constructor(
    private readonly opts: UblkAttachOptions,
    private readonly prior: DeviceState | undefined,
  ) {}

  /** Checks name, privileges, the driver, and an explicit device (free, or ours to recover). */
  static async prepare(opts: UblkAttachOptions): Promise<UblkFrontend> {
    checkName(opts.name);
    ublkAddon();
    requireSysAdmin();
    await ctl.getFeatures();
    const { prior } = opts.id === undefined ? {} : await checkExplicit(opts);
    return new UblkFrontend(opts, prior);
  }

  get recovered(): boolean {
    return !!this.prior;
  }

  get readOnly(): boolean {
    return this.prior ? this.prior.readOnly : this.opts.readOnly;
  }

  get id(): number {
    return this.state?.index ?? -1;
  }

  async start(ctx: FrontendContext): Promise<void> {
    try {
      if (this.prior) await this.recover(ctx);
      else await this.create(ctx);
    } catch (err) {
      await this.teardown();
      throw err;
    }
    saveState(this.state!);
    // A device stopped from outside (another STOP_DEV) ends every queue: the runtime stops then.
    void Promise.all(this.queues.map((q) => q.exited)).then(() => {
      if (!this.stopping) {
        log.warn(`${ublkDevicePath(this.id)} was stopped from outside nbdd; closing the image`);
        ctx.ended();
      }
    });
    log.info(`${ublkDevicePath(this.id)}: ${this.prior ? 'recovered' : 'attached'} ${this.state!.image} as '${this.state!.name}' (${this.state!.queues} queue(s) × ${this.state!.depth} tags)`);
  }

  private async create(ctx: FrontendContext): Promise<void> {
    const { opts } = this;
    const stack = ctx.stack;
    const caps = stack.queue.caps;
    const readOnly = opts.readOnly || caps.readOnly;
    const info = await ctl.addDevice({
      id: opts.id,
      queues: opts.queues,
      depth: opts.depth,
      maxIoBufBytes: MAX_IO_BYTES,
      flags: UBLK_F.CMD_IOCTL_ENCODE | UBLK_F.USER_RECOVERY | UBLK_F.USER_RECOVERY_REISSUE,
    });
    this.added = true;
    this.info = info;
    const logical = shiftOf(caps.minBlockSize);
    const params: DeviceParams = {
      sizeBytes: stack.queue.size,
      logicalBlockShift: logical,
      physicalBlockShift: Math.max(logical, shiftOf(caps.preferredBlockSize)),
      maxSectors: Math.floor(Math.min(MAX_IO_BYTES, info.maxIoBufBytes) / 512),
      readOnly,
      volatileCache: true,
      fua: true,
      maxDiscardSectors: readOnly ? 0 : MAX_DISCARD_SECTORS,
      maxWriteZeroesSectors: readOnly ? 0 : MAX_DISCARD_SECTORS,
      discardGranularity: Math.max(4096, 1 << logical),
    };
    if (stack.queue.size % (1 << logical) !== 0) {
      throw new NbddError(Errno.EINVAL, `${opts.image}: size ${stack.queue.size} is not a multiple of the ${1 << logical}-byte block`);
    }
    await ctl.setParams(info.devId, params);
    this.state = {
      driver: 'ublk',
      index: info.devId,
      name: opts.name,
      image: canonicalImage(opts.image),
      format: stack.image.kind,
      backendId: `nbdd:${opts.name}`,
      pid: process.pid,
      connections: info.nrHwQueues,
      queues: info.nrHwQueues,
      depth: info.queueDepth,
      readOnly,
      sizeBytes: stack.queue.size,
      blockSize: 1 << logical,
      serverFlags: 0,
      timeoutS: 0,
      deadConnTimeoutS: 0,
      attachedAt: new Date().toISOString(),
      ...(ctx.sidecarDir ? { sidecar: ctx.sidecarDir } : {}),
    };
    await this.startQueues(info, readOnly, ctx);
    await ctl.startDevice(info.devId, process.pid);
    this.started = true;
  }

  private async recover(ctx: FrontendContext): Promise<void> {
    const prior = this.prior!;
    const id = prior.index;
    const deadline = Date.now() + RECOVERY_WAIT_MS;
    for (;;) {
      try {
        await ctl.startRecovery(id);
        break;
      } catch (err) {
        if (!(err instanceof NbddError && err.errno === Errno.EBUSY) || Date.now() > deadline) throw err;
        await sleep(100);
      }
    }
    const info = await ctl.getDeviceInfo(id);
    if (ctx.stack.queue.size !== prior.sizeBytes) {
      throw new NbddError(Errno.EINVAL, `${this.opts.image} is now ${ctx.stack.queue.size} bytes, the device has ${prior.sizeBytes}; cannot recover`);
    }
    this.info = info;
    this.state = { ...prior, pid: process.pid, reattachedAt: new Date().toISOString(), ...(ctx.sidecarDir ? { sidecar: ctx.sidecarDir } : {}) };
    await this.startQueues(info, prior.readOnly, ctx);
    await ctl.endRecovery(id, process.pid);
    this.started = true;
  }

  private async startQueues(info: DevInfo, readOnly: boolean, ctx: FrontendContext): Promise<void> {
    this.cdevFd = await openCharDevice(info.devId);
    for (let q = 0; q < info.nrHwQueues; q++) {
      this.queues.push(new UblkQueue({ cdevFd: this.cdevFd, qid: q, depth: info.queueDepth, maxIo: info.maxIoBufBytes, queue: ctx.stack.queue, readOnly, mode: this.opts.queueMode ?? 'loop' }));
    }
    const flusher = await Promise.all(this.queues.map((q) => q.ready));
    if (flusher.some((e) => e !== 0)) log.warn('PR_SET_IO_FLUSHER refused on a queue thread (needs CAP_SYS_RESOURCE): memory reclaim may wait on this device');
  }

  status(): Record<string, unknown> {
    return {
      device: ublkDevicePath(this.id),
      driver: 'ublk',
      queues: this.queues.length,
      depth: this.info?.queueDepth ?? 0,
      queueThreads: (this.opts.queueMode ?? 'loop') === 'thread',
      inFlight: this.queues.reduce((n, q) => n + q.inFlight, 0),
    };
  }

  /** STOP_DEV (the queues keep answering until every FETCH is aborted), then DEL_DEV. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= this.teardown();
    return this.stopping;
  }

  private async teardown(): Promise<void> {
    this.stopping ??= Promise.resolve();
    const id = this.info?.devId ?? this.prior?.index ?? -1;
    const exits = Promise.all(this.queues.map((q) => q.exited));
    if (this.started) {
      try {
        await ctl.stopDevice(id);
      } catch (err) {
        if (!(err instanceof NbddError && err.errno === Errno.ENODEV)) log.warn(`${ublkDevicePath(id)}: STOP_DEV: ${messageOf(err)}`);
      }
      const timedOut = await Promise.race([exits.then(() => false), sleep(QUEUE_EXIT_MS).then(() => true)]);
      if (timedOut) log.warn(`${ublkDevicePath(id)}: queue threads still running ${QUEUE_EXIT_MS} ms after STOP_DEV; stopping them`);
    }
    // Not started (a failed attach), or stuck: closing the rings cancels the FETCHes.
    for (const q of this.queues) if (!q.hasExited) q.stop();
    await exits;
    if (this.cdevFd >= 0) {
      closeSync(this.cdevFd);
      this.cdevFd = -1;
    }
    if (this.prior && !this.started) {
      // A failed recovery leaves the device quiesced, its I/O held, for another attempt.
      log.warn(`${ublkDevicePath(id)}: recovery failed; the device stays, holding I/O, until \`nbdd attach IMAGE --driver ublk --device ${ublkDevicePath(id)}\` or \`nbdd detach\``);
      return;
    }
    if (id >= 0 && (this.added || this.prior)) {
      try {
        await ctl.deleteDevice(id);
      } catch (err) {
        if (!(err instanceof NbddError && err.errno === Errno.ENODEV)) log.warn(`${ublkDevicePath(id)}: DEL_DEV: ${messageOf(err)}`);
      }
      removeState(id, 'ublk');
      if (this.started) log.info(`${ublkDevicePath(id)}: detached; ${this.state?.image ?? this.opts.image} closed`);
    }
  }
}

/** Opens /dev/ublkcN, waiting briefly for devtmpfs/udev to create the node. */
async function openCharDevice(id: number): Promise<number> {
  const path = ublkCharPath(id);
  for (let i = 0; ; i++) {
    try {
      return openSync(path, 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || i >= 50) {
        throw new NbddError(Errno.ENODEV, `cannot open ${path}: ${messageOf(err)}`);
      }
      await sleep(20);
    }
  }
}

/** An attached /dev/ublkbN: the ublk frontend in a device runtime with its sidecar. */
export class UblkDevice {
  private constructor(
    private readonly runtime: DeviceRuntime,
    private readonly frontend: UblkFrontend,
  ) {}

  get id(): number {
    return this.frontend.id;
  }

  /** Where the metrics are served, when they are. */
  get metricsUrl(): string | null {
    return this.runtime.metricsUrl;
  }

  get done(): Promise<void> {
    return this.runtime.done;
  }

  static async attach(opts: UblkAttachOptions): Promise<{ device: UblkDevice; recovered: boolean }> {
    const frontend = await UblkFrontend.prepare(opts);
    const runtime = await DeviceRuntime.start({
      image: opts.image,
      stack: { format: opts.format, readOnly: frontend.readOnly, ...opts.remote, connections: opts.queues, bitmapLimits: { maxBitmaps: opts.maxBitmaps } },
      frontend,
      sidecar: { name: opts.name },
      metrics: opts.metrics && { listen: opts.metrics, name: opts.name },
    });
    return { device: new UblkDevice(runtime, frontend), recovered: frontend.recovered };
  }

  detach(): Promise<void> {
    return this.runtime.stop();
  }
}

/**
 * Whether ublk works here, for `--driver auto`: /dev/ublk-control is there, the addon loads and
 * the driver has what nbdd needs (GET_FEATURES; it also fails without CAP_SYS_ADMIN).
 */
export async function ublkUsable(): Promise<boolean> {
  if (!existsSync('/dev/ublk-control')) return false;
  try {
    ublkAddon();
    await ctl.getFeatures();
    return true;
  } catch {
    return false;
  }
}

/** /sys/class/ublk-char: the ids of every ublk device the kernel has (added, started or not). */
export function ublkIds(): number[] {
  try {
    return readdirSync('/sys/class/ublk-char').map((n) => /^ublkc(\d+)$/.exec(n)?.[1]).filter((v): v is string => !!v).map(Number).sort((a, b) => a - b);
  } catch {
    return [];
  }
}

/** /sys/block/ublkbN/size in bytes, or 0 when the disk is not there (not started). */
export function ublkSizeBytes(id: number): number {
  try {
    return Number(readFileSync(`/sys/block/ublkb${id}/size`, 'utf8').trim()) * 512;
  } catch {
    return 0;
  }
}
