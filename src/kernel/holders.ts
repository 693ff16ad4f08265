/**
 * Who uses a block device, for a detach that refuses to pull a disk from under its users
 * (`nbdd detach` without --force): mounts of the device or its partitions (/proc/self/mountinfo),
 * swap on them (/proc/swaps), kernel holders such as device-mapper or md (sysfs `holders/`), and
 * processes holding them open (/proc/PID/fd). Also the partitions of a device, as sysfs lists them.
 *
 * Every reader takes the roots of /sys and /proc so tests can give it a tree of their own.
 */
import { readdirSync, readFileSync, readlinkSync, realpathSync } from 'node:fs';
import { basename, join } from 'node:path';

export interface Roots {
  sys: string;
  proc: string;
}

const SYSTEM: Roots = { sys: '/sys', proc: '/proc' };

function read(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return null;
  }
}

function list(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

/**
 * Whether the block device `majorMinor` ("43:1") is an NBD or ublk device, a partition of one, or
 * stacked on one (device-mapper, md: its sysfs `slaves/`, followed down): its I/O is served by a
 * process in user space, perhaps this one. False when sysfs has no such device (the anonymous
 * devices of tmpfs, NFS or btrfs).
 */
export function onUserspaceDevice(majorMinor: string, roots: Roots = SYSTEM): boolean {
  const seen = new Set<string>();
  const check = (sysDir: string): boolean => {
    let real: string;
    try {
      real = realpathSync(sysDir);
    } catch {
      return false;
    }
    if (seen.has(real)) return false;
    seen.add(real);
    if (/^(nbd|ublkb)\d/.test(basename(real))) return true;
    return list(join(real, 'slaves')).some((s) => check(join(roots.sys, 'class', 'block', s)));
  };
  return check(join(roots.sys, 'dev', 'block', majorMinor));
}

/** The partitions of `dev` (e.g. nbd0 → nbd0p1, nbd0p2), in number order. */
export function partitionsOf(dev: string, roots: Roots = SYSTEM): string[] {
  const base = join(roots.sys, 'block', dev);
  return list(base)
    .filter((e) => e.startsWith(dev) && read(join(base, e, 'partition')) !== null)
    .sort((a, b) => Number(a.slice(dev.length).replace(/^p/, '')) - Number(b.slice(dev.length).replace(/^p/, '')));
}

/**
 * What keeps `dev` (a /sys/block name) in use, one phrase each; empty when nothing does.
 * `ignorePids`: processes not to count (the daemon serving the device).
 */
export function deviceUsers(dev: string, roots: Roots = SYSTEM, ignorePids: readonly number[] = []): string[] {
  const parts = partitionsOf(dev, roots);
  const nodes = new Map<string, string>(); // "major:minor" → name
  for (const name of [dev, ...parts]) {
    const sysDir = name === dev ? join(roots.sys, 'block', dev) : join(roots.sys, 'block', dev, name);
    const mm = read(join(sysDir, 'dev'))?.trim();
    if (mm) nodes.set(mm, name);
  }
  const users: string[] = [];
  // Mounts: mountinfo field 3 is major:minor, field 5 the mount point.
  for (const line of (read(join(roots.proc, 'self', 'mountinfo')) ?? '').split('\n')) {
    const f = line.split(' ');
    const name = f[2] ? nodes.get(f[2]) : undefined;
    if (name) users.push(`/dev/${name} is mounted on ${unescapeMount(f[4] ?? '?')}`);
  }
  for (const line of (read(join(roots.proc, 'swaps')) ?? '').split('\n').slice(1)) {
    const path = line.split(/\s+/)[0];
    const name = path?.replace(/^\/dev\//, '');
    if (name && [dev, ...parts].includes(name)) users.push(`/dev/${name} is in use as swap`);
  }
  for (const name of [dev, ...parts]) {
    const dir = name === dev ? join(roots.sys, 'block', dev, 'holders') : join(roots.sys, 'block', dev, name, 'holders');
    for (const h of list(dir)) {
      const dmName = read(join(roots.sys, 'block', h, 'dm', 'name'))?.trim();
      users.push(`/dev/${name} is held by ${h}${dmName ? ` (device-mapper '${dmName}')` : ''}`);
    }
  }
  const paths = new Set([dev, ...parts].map((n) => `/dev/${n}`));
  for (const pid of list(roots.proc).filter((p) => /^\d+$/.test(p))) {
    if (ignorePids.includes(Number(pid))) continue;
    const open = new Set<string>();
    for (const fd of list(join(roots.proc, pid, 'fd'))) {
      let target: string;
      try {
        target = readlinkSync(join(roots.proc, pid, 'fd', fd));
      } catch {
        continue;
      }
      if (paths.has(target)) open.add(target);
    }
    if (open.size > 0) {
      const comm = read(join(roots.proc, pid, 'comm'))?.trim() ?? '?';
      users.push(`${[...open].join(', ')} is open in pid ${pid} (${comm})`);
    }
  }
  return users;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
