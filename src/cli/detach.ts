/**
 * `nbdd detach DEVICE|NAME`: the daemon disconnects the device, flushes and closes the image, and
 * exits. When the daemon is gone, the device is disconnected here directly.
 */
import { Command } from 'commander';
import { Errno, NbddError } from '../core/errors.js';
import { logger } from '../core/log.js';
import { deviceUsers } from '../kernel/holders.js';
import { findDevice } from '../kernel/inventory.js';
import { NbdControl } from '../kernel/nbd-control.js';
import { deleteDevice, stopDevice } from '../ublk/control.js';
import { processAlive, removeState } from '../kernel/registry.js';

const log = logger('detach');

async function waitForExit(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (!processAlive(pid)) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

interface DetachOptions {
  timeout: number;
  force?: boolean;
}

async function detach(target: string, opts: DetachOptions): Promise<void> {
  const dev = await findDevice(target);
  if (dev.state === 'idle') throw new NbddError(Errno.ENODEV, `${dev.device} is not connected`);
  if (!opts.force) {
    const users = deviceUsers(dev.device.replace(/^\/dev\//, ''), undefined, dev.daemonPid === null ? [] : [dev.daemonPid]);
    if (users.length > 0) {
      throw new NbddError(Errno.EBUSY, `${dev.device} is in use: ${users.join('; ')}. Unmount or close it first, or use --force (its users then get I/O errors)`);
    }
  }
  if (dev.daemonPid !== null) {
    process.kill(dev.daemonPid, 'SIGTERM');
    if (!(await waitForExit(dev.daemonPid, opts.timeout * 1000))) {
      throw new NbddError(Errno.ETIMEDOUT, `nbdd pid ${dev.daemonPid} did not finish detaching ${dev.device} within ${opts.timeout} s`);
    }
    return;
  }
  // No daemon: a dead nbdd's device, or one another tool connected.
  if (dev.driver === 'ublk') {
    // A quiesced device holds its I/O for a new daemon; STOP_DEV fails it, DEL_DEV removes it.
    await stopDevice(dev.index).catch(() => undefined);
    await deleteDevice(dev.index);
    removeState(dev.index, 'ublk');
    log.info(`${dev.device} stopped and deleted (no daemon was serving it)`);
    return;
  }
  const control = NbdControl.open();
  try {
    control.disconnect(dev.index);
  } finally {
    control.close();
  }
  removeState(dev.index);
  log.info(`${dev.device} disconnected (no daemon was serving it)`);
}

export function register(program: Command): void {
  program
    .command('detach')
    .description('disconnect /dev/nbdN or /dev/ublkbN (or the device of that --name); the daemon flushes, closes the image and exits')
    .argument('<device>', '/dev/nbdN, nbdN, /dev/ublkbN, or a device name')
    .option('--timeout <s>', 'seconds to wait for the daemon to finish', (v) => Number(v), 60)
    .option('--force', 'detach even if the device is mounted, held or open (its users get I/O errors)')
    .action((target: string, opts: DetachOptions) => detach(target, opts));
}
