/**
 * Per-device state files: what `nbdd list`, `nbdd detach` and a re-attach need to know about a
 * device a daemon serves. One JSON file per device, `/run/nbdd/nbdN.json` ($NBDD_RUN_DIR
 * overrides the directory), written atomically (temp file + rename) by the daemon once the kernel
 * accepted the device, and removed by the daemon when it detaches. A file whose daemon died stays:
 * it is how a new daemon proves it may RECONFIGURE the device.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Errno, NbddError } from '../core/errors.js';
import { runDir } from '../core/paths.js';


/** Which kernel driver a device belongs to; state files are `<driver><index>.json`. */
export type Driver = 'nbd' | 'ublk';

export interface DeviceState {
  /** Absent in files written before ublk existed: nbd. */
  driver?: Driver;
  index: number;
  /** The user's name for the device; also the udev symlink /dev/disk/by-nbdd/NAME. */
  name: string;
  /** Absolute path (or memory: spec) of the image. */
  image: string;
  format: string;
  /** NBD_ATTR_BACKEND_IDENTIFIER; RECONFIGURE must repeat it. */
  backendId: string;
  /** The daemon serving the device now. */
  pid: number;
  connections: number;
  readOnly: boolean;
  sizeBytes: number;
  blockSize: number;
  serverFlags: number;
  timeoutS: number;
  deadConnTimeoutS: number;
  /** ISO time of the first CONNECT; `reattachedAt` of the latest RECONFIGURE, if any. */
  attachedAt: string;
  reattachedAt?: string;
  /** The sidecar directory (nbd.sock, control.sock) of the daemon serving the device. */
  sidecar?: string;
  /** ublk: hardware queues and tags per queue. */
  queues?: number;
  depth?: number;
}

function statePath(index: number, driver: Driver = 'nbd'): string {
  return join(runDir(), `${driver}${index}.json`);
}

/** Writes (or replaces) the state of a device atomically. */
export function saveState(state: DeviceState): void {
  mkdirSync(runDir(), { recursive: true, mode: 0o755 });
  const tmp = `${statePath(state.index, state.driver)}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o644 });
  renameSync(tmp, statePath(state.index, state.driver));
}

function parseState(path: string): DeviceState {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new NbddError(Errno.EUCLEAN, `${path} is not readable state: ${(err as Error).message}`);
  }
  const s = value as Partial<DeviceState>;
  if (typeof s.index !== 'number' || typeof s.name !== 'string' || typeof s.backendId !== 'string' || typeof s.pid !== 'number') {
    throw new NbddError(Errno.EUCLEAN, `${path} lacks index, name, backendId or pid`);
  }
  return s as DeviceState;
}

export function loadState(index: number, driver: Driver = 'nbd'): DeviceState | undefined {
  const path = statePath(index, driver);
  return existsSync(path) ? parseState(path) : undefined;
}

/** Every state file; unreadable ones are skipped (a half-written file never has the final name). */
export function listStates(driver: Driver = 'nbd'): DeviceState[] {
  if (!existsSync(runDir())) return [];
  const out: DeviceState[] = [];
  for (const f of readdirSync(runDir())) {
    if (!new RegExp(`^${driver}\\d+\\.json$`).test(f)) continue;
    try {
      out.push(parseState(join(runDir(), f)));
    } catch {
      /* not ours to judge here; `list` shows the device from sysfs anyway */
    }
  }
  return out.sort((a, b) => a.index - b.index);
}

export function removeState(index: number, driver: Driver = 'nbd'): void {
  rmSync(statePath(index, driver), { force: true });
}

/** The file a daemon's stdout and stderr go to: `<runDir>/NAME.log`. */
export function logPath(name: string): string {
  return join(runDir(), `${name}.log`);
}

/** Whether a process with this pid exists (signal 0; EPERM still means it exists). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
