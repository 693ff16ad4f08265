/**
 * What sysfs says about nbd devices: /sys/block/nbdN/{size,backend,pid,ro}. Reads only; a missing
 * attribute (device not configured) reads as undefined.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';

const SYS_BLOCK = '/sys/block';
const SECTOR = 512;

function attr(index: number, name: string): string | undefined {
  try {
    return readFileSync(`${SYS_BLOCK}/nbd${index}/${name}`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

export interface SysfsDevice {
  index: number;
  sizeBytes: number;
  /** The backend identifier (empty when the device was connected without one). */
  backend?: string;
  /** Thread id of the CONNECT sender; present only while the device is configured. */
  pid?: number;
  readOnly: boolean;
}

export function readSysfs(index: number): SysfsDevice | undefined {
  if (!existsSync(`${SYS_BLOCK}/nbd${index}`)) return undefined;
  const pid = attr(index, 'pid');
  return {
    index,
    sizeBytes: Number(attr(index, 'size') ?? 0) * SECTOR,
    backend: attr(index, 'backend'),
    pid: pid ? Number(pid) : undefined,
    readOnly: attr(index, 'ro') === '1',
  };
}

/** Indexes of every /sys/block/nbdN. */
export function sysfsIndexes(): number[] {
  if (!existsSync(SYS_BLOCK)) return [];
  return readdirSync(SYS_BLOCK)
    .map((d) => /^nbd(\d+)$/.exec(d))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/** Parses `/dev/nbdN`, `nbdN` or `N`; undefined when `arg` is none of those. */
export function parseDeviceArg(arg: string): number | undefined {
  const m = /^(?:\/dev\/)?nbd(\d+)$/.exec(arg) ?? /^(\d+)$/.exec(arg);
  return m ? Number(m[1]) : undefined;
}
