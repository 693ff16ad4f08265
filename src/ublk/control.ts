/**
 * /dev/ublk-control: the commands that create, configure, start, stop, recover and delete a
 * ublk device. Each command is one SQE128 URING_CMD with the ioctl-encoded opcode, issued by the
 * addon on a pool thread (it may block: START_DEV waits for every queue's FETCHes and for the
 * partition scan, which reads the device through our own queues). Errors become NbddErrors with
 * advice (driver missing, kernel too old, not root, device busy).
 */
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';
import { ublkAddon } from './addon.js';
import {
  DEV_INFO_SIZE,
  UBLK_ANY_ID,
  UBLK_CMD,
  UBLK_F,
  UBLK_NO_QUEUE,
  decodeDevInfo,
  encodeDevInfo,
  encodeParams,
  ublkDevicePath,
  type DevInfo,
  type DeviceParams,
} from './uapi.js';

const NO_DRIVER = 'the ublk driver is not loaded: /dev/ublk-control is missing (modprobe ublk_drv; it needs Linux 6.5 or newer)';
const NEEDS_ROOT = 'ublk devices need root (CAP_SYS_ADMIN): run nbdd as root';
/** What nbdd needs from the driver: ioctl-encoded commands and crash recovery with reissue. */
export const REQUIRED_FEATURES = UBLK_F.CMD_IOCTL_ENCODE | UBLK_F.USER_RECOVERY | UBLK_F.USER_RECOVERY_REISSUE;

type CommandName = keyof typeof UBLK_CMD;

export class UblkControlError extends NbddError {}

function fail(cmd: CommandName, devId: number, errno: number): never {
  const dev = devId === UBLK_ANY_ID ? 'a new ublk device' : ublkDevicePath(devId);
  let msg: string;
  switch (errno) {
    case Errno.EPERM:
    case Errno.EACCES:
      msg = cmd === 'SET_PARAMS' ? `${dev}: parameters can only be set before the device starts` : NEEDS_ROOT;
      break;
    case Errno.EEXIST:
      msg = `${dev} already exists (another server owns it); pick another --device or let the kernel choose`;
      break;
    case Errno.ENODEV:
      msg = `${dev} does not exist`;
      break;
    case Errno.EBUSY:
      msg = `${dev} is busy`;
      break;
    default:
      msg = `ublk ${cmd} on ${dev} failed: ${nameOfErrno(errno)}`;
  }
  throw new UblkControlError(errno, msg);
}

async function run(cmd: CommandName, devId: number, buffer: Buffer | null, data0 = 0, queueId = UBLK_NO_QUEUE): Promise<number> {
  let res: number;
  try {
    res = await ublkAddon().ublkCtrl(UBLK_CMD[cmd], devId, queueId, buffer, data0, 0);
  } catch (err) {
    const errno = (err as { errno?: number }).errno;
    if (errno === Errno.ENOENT || errno === Errno.ENXIO || errno === Errno.ENODEV) throw new UblkControlError(Errno.ENODEV, NO_DRIVER);
    if (errno === Errno.EACCES || errno === Errno.EPERM) throw new UblkControlError(Errno.EPERM, NEEDS_ROOT);
    throw err;
  }
  if (res < 0) fail(cmd, devId, -res);
  return res;
}

/** GET_FEATURES; a kernel without it (before 6.5) or without what nbdd needs gets a clear error. */
export async function getFeatures(): Promise<bigint> {
  const buf = Buffer.alloc(8);
  try {
    await run('GET_FEATURES', 0, buf);
  } catch (err) {
    if (err instanceof UblkControlError && err.errno !== Errno.EPERM && err.message !== NO_DRIVER) {
      throw new UblkControlError(Errno.ENOSYS, `this kernel's ublk driver is too old (no GET_FEATURES: ${nameOfErrno(err.errno)}); nbdd needs Linux 6.5 or newer`);
    }
    throw err;
  }
  const features = buf.readBigUInt64LE(0);
  if ((features & REQUIRED_FEATURES) !== REQUIRED_FEATURES) {
    throw new UblkControlError(Errno.ENOSYS, `this kernel's ublk driver lacks ioctl-encoded commands or user recovery (features 0x${features.toString(16)})`);
  }
  return features;
}

export interface AddOptions {
  /** Wanted id, or undefined for the kernel's choice. */
  id?: number;
  queues: number;
  depth: number;
  maxIoBufBytes: number;
  flags: bigint;
}

/** ADD_DEV: returns what the kernel granted (id, clamped queues, negotiated flags). */
export async function addDevice(o: AddOptions): Promise<DevInfo> {
  const id = o.id ?? UBLK_ANY_ID;
  const buf = encodeDevInfo({ nrHwQueues: o.queues, queueDepth: o.depth, maxIoBufBytes: o.maxIoBufBytes, devId: id, flags: o.flags });
  await run('ADD_DEV', id, buf);
  return decodeDevInfo(buf);
}

export async function getDeviceInfo(id: number): Promise<DevInfo> {
  const buf = Buffer.alloc(DEV_INFO_SIZE);
  await run('GET_DEV_INFO', id, buf);
  return decodeDevInfo(buf);
}

/** GET_DEV_INFO, or undefined when there is no such device. */
export async function findDeviceInfo(id: number): Promise<DevInfo | undefined> {
  try {
    return await getDeviceInfo(id);
  } catch (err) {
    if (err instanceof UblkControlError && err.errno === Errno.ENODEV && err.message !== NO_DRIVER) return undefined;
    throw err;
  }
}

export async function setParams(id: number, params: DeviceParams): Promise<void> {
  await run('SET_PARAMS', id, encodeParams(params));
}

/** START_DEV: blocks until every queue has fetched every tag, then adds the disk. */
export async function startDevice(id: number, pid: number): Promise<void> {
  await run('START_DEV', id, null, pid);
}

export async function stopDevice(id: number): Promise<void> {
  await run('STOP_DEV', id, null);
}

export async function deleteDevice(id: number): Promise<void> {
  await run('DEL_DEV', id, null);
}

/** START_USER_RECOVERY; EBUSY while the old server's char device is still held (retry). */
export async function startRecovery(id: number): Promise<void> {
  await run('START_USER_RECOVERY', id, null);
}

export async function endRecovery(id: number, pid: number): Promise<void> {
  await run('END_USER_RECOVERY', id, null, pid);
}
