/**
 * Where a device's files live and what may name a device: the one definition every part uses
 * (kernel registry, sidecar, `nbdd status NAME`). `$NBDD_RUN_DIR` moves the whole tree.
 */
import { join } from 'node:path';
import { Errno, NbddError } from './errors.js';

/** `/run/nbdd`, or `$NBDD_RUN_DIR` when set (read each call so tests and wrappers may set it late). */
export function runDir(): string {
  return process.env.NBDD_RUN_DIR || '/run/nbdd';
}

/** A device's sidecar directory: `runDir()/NAME`. */
export function sidecarDir(name: string): string {
  return join(runDir(), checkName(name));
}

/** What a udev symlink, a file name and an NBD export name can all carry. */
const DEVICE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isDeviceName(name: string): boolean {
  return DEVICE_NAME.test(name);
}

/** `name` when it can name a device; EINVAL with what is allowed otherwise. */
export function checkName(name: string): string {
  if (!isDeviceName(name)) {
    throw new NbddError(Errno.EINVAL, `device name '${name}' must be 1..64 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)`);
  }
  return name;
}
