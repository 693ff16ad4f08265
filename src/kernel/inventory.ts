/**
 * Everything nbdd can say about its kernel devices — nbd ones from netlink STATUS and sysfs, ublk
 * ones from GET_DEV_INFO (src/ublk/inventory.ts) — with the state files: what `nbdd list` prints
 * and what `nbdd detach` looks up.
 */
import { Errno, NbddError } from '../core/errors.js';
import { ublkInventory } from '../ublk/inventory.js';
import { parseUblkDevice, ublkDevicePath } from '../ublk/uapi.js';
import { NbdControl, devicePath } from './nbd-control.js';
import { listStates, processAlive, type DeviceState, type Driver } from './registry.js';
import { parseDeviceArg, readSysfs, sysfsIndexes } from './sysfs.js';

/**
 * - `idle`: no configuration;
 * - `connected`: configured and its nbdd daemon alive (or configured by another tool: `daemonPid` unset);
 * - `daemon-dead`: configured by nbdd whose daemon is gone: the kernel holds I/O for the
 *   dead-connection timeout, `nbdd attach IMAGE --device DEV` takes it over.
 */
export type DeviceCondition = 'idle' | 'connected' | 'daemon-dead';

export interface DeviceReport {
  driver: Driver;
  device: string;
  index: number;
  state: DeviceCondition;
  sizeBytes: number;
  backend: string | null;
  name: string | null;
  image: string | null;
  format: string | null;
  daemonPid: number | null;
  connections: number | null;
  readOnly: boolean;
  timeoutS: number | null;
  deadConnTimeoutS: number | null;
  sidecar: string | null;
  /** ublk: hardware queues, tags per queue, and the driver's own state (live, quiesced, dead). */
  queues: number | null;
  depth: number | null;
  kernelState: string | null;
}

function report(index: number, connected: boolean, state: DeviceState | undefined): DeviceReport {
  const sys = readSysfs(index);
  // A state file only describes the device while the kernel still has it configured with our id.
  const ours = connected && state && (sys?.backend ?? '') === state.backendId ? state : undefined;
  const alive = ours ? processAlive(ours.pid) : false;
  return {
    driver: 'nbd',
    device: devicePath(index),
    index,
    state: !connected ? 'idle' : ours && !alive ? 'daemon-dead' : 'connected',
    sizeBytes: connected ? (sys?.sizeBytes ?? 0) : 0,
    backend: sys?.backend || null,
    name: ours?.name ?? null,
    image: ours?.image ?? null,
    format: ours?.format ?? null,
    daemonPid: ours && alive ? ours.pid : null,
    connections: ours?.connections ?? null,
    readOnly: sys?.readOnly ?? false,
    timeoutS: ours?.timeoutS ?? null,
    deadConnTimeoutS: ours?.deadConnTimeoutS ?? null,
    sidecar: ours && alive ? (ours.sidecar ?? null) : null,
    queues: null,
    depth: null,
    kernelState: null,
  };
}

/** Every nbd device the kernel knows (STATUS), plus any sysfs-only ones, in index order. */
export function nbdInventory(): DeviceReport[] {
  const control = NbdControl.open();
  let status;
  try {
    status = control.status();
  } finally {
    control.close();
  }
  const connected = new Map(status.map((s) => [s.index, s.connected]));
  for (const i of sysfsIndexes()) if (!connected.has(i)) connected.set(i, false);
  const states = new Map(listStates().map((s) => [s.index, s]));
  return [...connected.entries()].sort((a, b) => a[0] - b[0]).map(([i, c]) => report(i, c, states.get(i)));
}

/**
 * nbd devices, then ublk devices. A machine with only one of the two drivers lists that one; with
 * neither, the nbd error (modprobe advice) is thrown.
 */
export async function inventory(): Promise<DeviceReport[]> {
  let nbd: DeviceReport[] = [];
  let nbdError: unknown = null;
  try {
    nbd = nbdInventory();
  } catch (err) {
    nbdError = err;
  }
  const ublk = await ublkInventory();
  if (nbdError && !ublk.available) throw nbdError;
  return [...nbd, ...ublk.devices];
}

/** The device `arg` names: /dev/nbdN, nbdN, N, /dev/ublkbN, ublkbN, or a name from `attach --name`. */
export async function findDevice(arg: string): Promise<DeviceReport> {
  const ublkId = parseUblkDevice(arg);
  if (ublkId !== undefined) {
    // A ublk path needs only the ublk driver; without it the nbd driver's advice would mislead.
    const ublk = await ublkInventory();
    if (!ublk.available) throw new NbddError(Errno.ENODEV, `no ublk device ${ublkDevicePath(ublkId)}: the ublk driver is not loaded (modprobe ublk_drv)`);
    const found = ublk.devices.find((d) => d.index === ublkId);
    if (!found) throw new NbddError(Errno.ENODEV, `no ublk device ${ublkDevicePath(ublkId)}`);
    return found;
  }
  const all = await inventory();
  const index = parseDeviceArg(arg);
  const found = index !== undefined ? all.find((d) => d.driver === 'nbd' && d.index === index) : all.find((d) => d.name === arg);
  if (!found) throw new NbddError(Errno.ENODEV, `no nbd device ${index !== undefined ? devicePath(index) : `named '${arg}'`}`);
  return found;
}
