/**
 * Everything nbdd can say about nbd devices, from the kernel (netlink STATUS, sysfs) and the
 * state files: what `nbdd list` prints and what `nbdd detach` looks up.
 */
import { Errno, NbddError } from '../core/errors.js';
import { NbdControl, devicePath } from './nbd-control.js';
import { listStates, processAlive, type DeviceState } from './registry.js';
import { parseDeviceArg, readSysfs, sysfsIndexes } from './sysfs.js';

/**
 * - `idle`: no configuration;
 * - `connected`: configured and its nbdd daemon alive (or configured by another tool: `daemonPid` unset);
 * - `daemon-dead`: configured by nbdd whose daemon is gone: the kernel holds I/O for the
 *   dead-connection timeout, `nbdd attach IMAGE --device DEV` takes it over.
 */
export type DeviceCondition = 'idle' | 'connected' | 'daemon-dead';

export interface DeviceReport {
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
}

function report(index: number, connected: boolean, state: DeviceState | undefined): DeviceReport {
  const sys = readSysfs(index);
  // A state file only describes the device while the kernel still has it configured with our id.
  const ours = connected && state && (sys?.backend ?? '') === state.backendId ? state : undefined;
  const alive = ours ? processAlive(ours.pid) : false;
  return {
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
  };
}

/** Every nbd device the kernel knows (STATUS), plus any sysfs-only ones, in index order. */
export function inventory(): DeviceReport[] {
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

/** The device `arg` names: /dev/nbdN, nbdN, N, or a device name from `nbdd attach --name`. */
export function findDevice(arg: string): DeviceReport {
  const all = inventory();
  const index = parseDeviceArg(arg);
  const found = index !== undefined ? all.find((d) => d.index === index) : all.find((d) => d.name === arg);
  if (!found) throw new NbddError(Errno.ENODEV, `no nbd device ${index !== undefined ? devicePath(index) : `named '${arg}'`}`);
  return found;
}
