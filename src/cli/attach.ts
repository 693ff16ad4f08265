/**
 * `nbdd attach IMAGE`: serve an image as /dev/nbdN through the kernel NBD driver (netlink), or as
 * /dev/ublkbN through ublk (`--driver ublk`).
 * By default the command returns once the device is usable and a daemon keeps serving it;
 * `--foreground` keeps serving in this process (for systemd). See docs/kernel.md.
 */
import { existsSync } from 'node:fs';
import { basename } from 'node:path';
import { Command, Option } from 'commander';
import { Errno, NbddError, errnoOf, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { FORMATS, isMemorySpec, type Format } from '../backends/open.js';
import { createQcow2 } from '../backends/qcow2/create.js';
import { READY_FD, reportReadiness, spawnDaemon, type Readiness } from '../kernel/daemonize.js';
import { checkName } from '../core/paths.js';
import { KernelDevice } from '../kernel/device.js';
import { inventory } from '../kernel/inventory.js';
import { DEFAULT_BITMAP_LIMITS } from '../bitmaps/bitmap-set.js';
import { devicePath } from '../kernel/nbd-control.js';
import { logPath, loadState, type Driver } from '../kernel/registry.js';
import { parseDeviceArg } from '../kernel/sysfs.js';
import { sdNotify } from '../sys/systemd.js';
import { becomeIoFlusher } from '../sys/io-flusher.js';
import { dropStartupPages } from '../sys/startup-pages.js';
import { UblkDevice, ublkUsable } from '../ublk/frontend.js';
import { parseUblkDevice, ublkDevicePath } from '../ublk/uapi.js';
import type { MetricsListen } from '../runtime/metrics.js';
import { addRemoteOptions, intArg, MAX_BITMAPS_HELP, METRICS_HELP, metricsArg, remoteArgs, remoteOptions, sizeArg, type RemoteCliOptions } from './options.js';

const log = logger('attach');

interface AttachCliOptions extends RemoteCliOptions {
  /** Unset: what --device names, else nbd. */
  driver?: Driver | 'auto';
  queues: number;
  depth: number;
  /** ublk: each queue on a thread of its own instead of the event loop. */
  queueThreads?: boolean;
  device?: string;
  readOnly?: boolean;
  format: Format;
  connections: number;
  timeout: number;
  deadConnTimeout: number;
  name?: string;
  foreground?: boolean;
  create?: number;
  json?: boolean;
  readyFd?: number;
  metrics?: MetricsListen;
  /** false with --no-partitions. */
  partitions: boolean;
  maxBitmaps: number;
}

/** The device name: --name, the name a re-attached device already has, or the image's base name. */
function resolveName(image: string, driver: Driver, index: number | undefined, name: string | undefined): string {
  if (name) return checkName(name);
  const prior = index === undefined ? undefined : loadState(index, driver);
  if (prior) return prior.name;
  const base = isMemorySpec(image) ? 'memory' : basename(image).replace(/\.(qcow2|raw|img)$/i, '');
  const cleaned = base.replace(/[^A-Za-z0-9._-]/g, '_').replace(/^[._-]+/, '').slice(0, 64);
  return checkName(cleaned || 'disk');
}

/** --create SIZE: a new qcow2 image when IMAGE does not exist yet. */
async function createIfMissing(image: string, size: number, format: Format): Promise<void> {
  if (existsSync(image) || isMemorySpec(image)) return;
  if (format === 'raw') throw new NbddError(Errno.EINVAL, '--create makes qcow2 images; drop --format raw');
  await createQcow2(image, { size });
  log.info(`created ${image} (qcow2, ${size} bytes)`);
}

function printReady(r: Readiness & { ok: true }, json: boolean | undefined): void {
  const { ok: _ok, ...fields } = r;
  process.stdout.write(json ? `${JSON.stringify(fields)}\n` : `${r.device}\n`);
}

/** The child's arguments: everything resolved, plus --foreground and the readiness fd. */
function childArgs(image: string, name: string, driver: Driver, opts: AttachCliOptions): string[] {
  const args = ['attach', image, '--name', name, '--format', opts.format, '--connections', String(opts.connections)];
  args.push('--driver', driver, '--queues', String(opts.queues), '--depth', String(opts.depth));
  args.push('--timeout', String(opts.timeout), '--dead-conn-timeout', String(opts.deadConnTimeout), ...remoteArgs(opts));
  if (opts.device) args.push('--device', opts.device);
  if (opts.readOnly) args.push('--read-only');
  if (opts.queueThreads) args.push('--queue-threads');
  if (!opts.partitions) args.push('--no-partitions');
  args.push('--max-bitmaps', String(opts.maxBitmaps));
  if (opts.metrics) args.push('--metrics', `${opts.metrics.host.includes(':') ? `[${opts.metrics.host}]` : opts.metrics.host}:${opts.metrics.port}`);
  args.push('--foreground', '--ready-fd', String(READY_FD));
  return args;
}

async function serveForeground(image: string, name: string, index: number | undefined, opts: AttachCliOptions): Promise<void> {
  let attached: Awaited<ReturnType<typeof KernelDevice.attach>>;
  await becomeIoFlusher(true); // before the runtime's threads start: they inherit it
  dropStartupPages();
  try {
    attached = await KernelDevice.attach({
      image,
      name,
      index,
      format: opts.format,
      readOnly: !!opts.readOnly,
      connections: opts.connections,
      timeoutS: opts.timeout,
      deadConnTimeoutS: opts.deadConnTimeout,
      remote: remoteOptions(opts),
      metrics: opts.metrics,
      partitions: opts.partitions,
      maxBitmaps: opts.maxBitmaps,
    });
  } catch (err) {
    if (opts.readyFd !== undefined) await reportReadiness(opts.readyFd, { ok: false, errno: errnoOf(err), message: messageOf(err) });
    throw err;
  }
  const { device, reattached } = attached;
  const ready = { ok: true, device: devicePath(device.index), index: device.index, name, pid: process.pid, reattached, driver: 'nbd' } as const;
  await serveUntilDetached({ ...ready, ...(device.metricsUrl ? { metrics: device.metricsUrl } : {}) }, device, opts);
}

/** Reports readiness (pipe or stdout), detaches on SIGTERM/SIGINT, and returns when the device is gone. */
async function serveUntilDetached(ready: Readiness & { ok: true }, device: { detach(): Promise<void>; done: Promise<void> }, opts: AttachCliOptions): Promise<void> {
  if (opts.readyFd !== undefined) await reportReadiness(opts.readyFd, ready);
  else printReady(ready, opts.json);
  sdNotify({ READY: 1, STATUS: `serving ${ready.device} (${ready.name})`, MAINPID: process.pid });
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.on(sig, () => {
      log.info(`${sig}: detaching ${ready.device}`);
      sdNotify({ STOPPING: 1, STATUS: `detaching ${ready.device}` });
      device.detach().catch((err) => {
        log.error(messageOf(err));
        process.exit(1);
      });
    });
  }
  process.on('SIGHUP', () => log.info('SIGHUP ignored'));
  await device.done;
}

/** `--driver ublk` in the foreground: the same readiness and signals as the NBD path. */
async function serveUblkForeground(image: string, name: string, id: number | undefined, opts: AttachCliOptions): Promise<void> {
  let attached: Awaited<ReturnType<typeof UblkDevice.attach>>;
  await becomeIoFlusher(true); // before the queue threads start: they inherit it
  dropStartupPages();
  try {
    attached = await UblkDevice.attach({ image, name, id, format: opts.format, readOnly: !!opts.readOnly, remote: remoteOptions(opts), queues: opts.queues, depth: opts.depth, queueMode: opts.queueThreads ? 'thread' : 'loop', metrics: opts.metrics, maxBitmaps: opts.maxBitmaps });
  } catch (err) {
    if (opts.readyFd !== undefined) await reportReadiness(opts.readyFd, { ok: false, errno: errnoOf(err), message: messageOf(err) });
    throw err;
  }
  const { device, recovered } = attached;
  const ready = { ok: true, device: ublkDevicePath(device.id), index: device.id, name, pid: process.pid, reattached: recovered, driver: 'ublk' } as const;
  await serveUntilDetached({ ...ready, ...(device.metricsUrl ? { metrics: device.metricsUrl } : {}) }, device, opts);
}

/**
 * The device `name` still has when no daemon serves it any more (the daemon crashed, or systemd
 * restarts the unit): attach re-attaches it, so I/O the kernel holds resumes on the same device.
 * A device of that name with a live daemon is refused.
 */
async function orphanedDevice(name: string, driver: Driver | undefined): Promise<{ index: number; driver: Driver } | undefined> {
  const all = await inventory().catch(() => []);
  const mine = all.filter((d) => (driver === undefined || d.driver === driver) && d.name === name);
  const live = mine.find((d) => d.daemonPid !== null);
  if (live) throw new NbddError(Errno.EBUSY, `'${name}' is already attached as ${live.device} (nbdd pid ${live.daemonPid})`);
  const orphan = mine.find((d) => d.state === 'daemon-dead');
  if (orphan) log.info(`${orphan.device} ('${name}') has no daemon; re-attaching it`);
  return orphan && { index: orphan.index, driver: orphan.driver };
}

/** Options only one driver has: given on the command line, they choose that driver for `auto`. */
const NBD_ONLY = ['connections', 'timeout', 'deadConnTimeout', 'partitions'] as const;
const UBLK_ONLY = ['queues', 'depth', 'queueThreads'] as const;

/**
 * The driver: --driver nbd|ublk; else what --device names; else (`auto`, the default) the driver
 * the other options belong to, else ublk where it works (docs/kernel.md, "Which driver"), else nbd.
 * `undefined` while it is still open to an orphaned device of either driver with the same name.
 */
export function explicitDriver(opts: Pick<AttachCliOptions, 'driver' | 'device'>, given: (option: string) => boolean): Driver | undefined {
  if (opts.driver === 'nbd' || opts.driver === 'ublk') return opts.driver;
  if (opts.device !== undefined) return parseUblkDevice(opts.device) !== undefined ? 'ublk' : 'nbd';
  if (NBD_ONLY.some(given)) return 'nbd';
  if (UBLK_ONLY.some(given)) return 'ublk';
  return undefined;
}

async function attach(image: string, opts: AttachCliOptions, cmd: Command): Promise<void> {
  const given = (option: string): boolean => cmd.getOptionValueSource(option) === 'cli';
  let driver = explicitDriver(opts, given);
  let index: number | undefined;
  if (opts.device !== undefined) {
    index = driver === 'ublk' ? parseUblkDevice(opts.device) : parseDeviceArg(opts.device);
    if (index === undefined) throw new NbddError(Errno.EINVAL, `--device '${opts.device}' is not ${driver === 'ublk' ? '/dev/ublkbN' : '/dev/nbdN'}`);
  }
  if (opts.create !== undefined) await createIfMissing(image, opts.create, opts.format);
  if (!isMemorySpec(image) && !/^[a-z][a-z0-9+.-]*:\/\//i.test(image) && !existsSync(image)) {
    throw new NbddError(Errno.ENOENT, `${image} does not exist (use --create SIZE to make a new qcow2 image)`);
  }
  if (index === undefined && opts.name !== undefined) {
    const orphan = await orphanedDevice(checkName(opts.name), driver);
    if (orphan) ({ index, driver } = orphan);
  }
  driver ??= (await ublkUsable()) ? 'ublk' : 'nbd';
  const name = resolveName(image, driver, index, opts.name);
  if (opts.foreground) return driver === 'ublk' ? serveUblkForeground(image, name, index, opts) : serveForeground(image, name, index, opts);
  // A ublk daemon gets its own mount namespace (docs/kernel.md, "ublk traps"): it must never be
  // the last holder of a mount of its own device.
  const wrap = driver === 'ublk' ? ['unshare', '--mount', '--propagation', 'slave', '--'] : [];
  printReady(await spawnDaemon(childArgs(image, name, driver, opts), logPath(name), wrap), opts.json);
}

export function register(program: Command): void {
  const cmd = program
    .command('attach')
    .description('attach an image as /dev/nbdN (kernel NBD) or /dev/ublkbN (ublk); prints the device once usable')
    .argument('<image>', 'image file, block device, or memory:SIZE')
    .addOption(new Option('--driver <driver>', 'kernel driver: nbd, ublk, or auto (the default: what --device or the driver-only options name, else ublk where ublk_drv works, else nbd)').choices(['nbd', 'ublk', 'auto']))
    .option('-d, --device <dev>', '/dev/nbdN or /dev/ublkbN to use (default: the kernel picks); a device this image still owns is re-attached / recovered')
    .option('-q, --queues <n>', 'ublk: hardware queues', intArg(1, 64), 1)
    .option('--depth <n>', 'ublk: requests in flight per queue', intArg(1, 4096), 128)
    .option('--queue-threads', 'ublk: serve each queue from a thread of its own instead of the event loop (kernel copies of large requests off the event loop, at the price of two thread hops per request)')
    .option('-r, --read-only', 'attach read-only')
    .addOption(new Option('-f, --format <format>', 'image format').choices([...FORMATS]).default('auto'))
    .option('-c, --connections <n>', 'connections (kernel hardware queues); >1 needs a multi-conn backend', intArg(1, 64), 1)
    .option('-t, --timeout <s>', 'per-request timeout in seconds; a request older than this marks its connection dead and is retried on another or a new one (default 0: none — a slow but live daemon is never cut off)', intArg(0, 86400), 0)
    .option('--dead-conn-timeout <s>', 'seconds the kernel holds I/O waiting for a new daemon once every connection is dead', intArg(0, 86400), 60)
    .option('-n, --name <name>', 'device name (the /dev/disk/by-nbdd/NAME link); default: the image file name')
    .option('--foreground', 'serve in this process instead of a daemon (for systemd)')
    .option('--create <size>', 'create a qcow2 image of this size when IMAGE does not exist', sizeArg)
    .option('--no-partitions', 'nbd: do not have the kernel read the partition table at attach (ublk devices are scanned by the kernel itself)')
    .option('--metrics <addr:port>', METRICS_HELP, metricsArg)
    .option('--max-bitmaps <n>', MAX_BITMAPS_HELP, intArg(1, 65535), DEFAULT_BITMAP_LIMITS.maxBitmaps)
    .option('--json', 'print the device as a JSON object')
    .addOption(new Option('--ready-fd <fd>', 'internal: report readiness on this fd').argParser(intArg(3, 1023)).hideHelp());
  addRemoteOptions(cmd).action((image: string, opts: AttachCliOptions, command: Command) => attach(image, opts, command));
}
