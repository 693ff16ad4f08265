/**
 * Who uses a block device (src/kernel/holders.ts), over a made-up /sys and /proc: mounts of the
 * disk and its partitions, swap, device-mapper holders, processes with it open — and the daemon
 * itself not counted.
 */
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { deviceUsers, onUserspaceDevice, partitionsOf, type Roots } from '../../src/kernel/holders.js';

let root: string;
let roots: Roots;

function put(path: string, text: string): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, text);
}

beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'nbdd-holders-'));
  roots = { sys: join(root, 'sys'), proc: join(root, 'proc') };
  put(join(roots.sys, 'block/nbd0/dev'), '43:0\n');
  for (const n of [1, 2, 10]) {
    put(join(roots.sys, `block/nbd0/nbd0p${n}/dev`), `43:${n}\n`);
    put(join(roots.sys, `block/nbd0/nbd0p${n}/partition`), `${n}\n`);
  }
  mkdirSync(join(roots.sys, 'block/nbd0/queue'), { recursive: true }); // not a partition
  put(join(roots.proc, 'self/mountinfo'), '22 1 8:1 / / rw - ext4 /dev/sda1 rw\n');
  put(join(roots.proc, 'swaps'), 'Filename\tType\tSize\tUsed\tPriority\n');
});
afterEach(() => rmSync(root, { recursive: true, force: true }));

describe('onUserspaceDevice', () => {
  /** A sysfs tree in the kernel's shape: devices under devices/, dev/block and class/block links to them. */
  function device(name: string, majorMinor: string, parent?: string, slaves: string[] = []): void {
    const dir = join(roots.sys, 'devices/virtual/block', ...(parent ? [parent, name] : [name]));
    mkdirSync(join(dir, 'slaves'), { recursive: true });
    for (const s of slaves) symlinkSync(join(roots.sys, 'class/block', s), join(dir, 'slaves', s));
    for (const link of [join(roots.sys, 'dev/block', majorMinor), join(roots.sys, 'class/block', name)]) {
      mkdirSync(dirname(link), { recursive: true });
      symlinkSync(dir, link);
    }
  }

  it('finds NBD and ublk disks, their partitions, and devices stacked on them; not others', () => {
    device('nbd3', '43:96');
    device('nbd3p1', '43:97', 'nbd3');
    device('ublkb0', '259:4');
    device('sda', '8:0');
    device('sda1', '8:1', 'sda');
    device('dm-0', '254:0', undefined, ['nbd3p1']);
    device('md0', '9:0', undefined, ['dm-0']);
    device('dm-1', '254:1', undefined, ['sda1']);
    expect(['43:96', '43:97', '259:4', '254:0', '9:0'].map((d) => onUserspaceDevice(d, roots))).toEqual([true, true, true, true, true]);
    expect(['8:0', '8:1', '254:1', '0:45'].map((d) => onUserspaceDevice(d, roots))).toEqual([false, false, false, false]);
  });
});

describe('partitionsOf', () => {
  it('lists partitions in number order, skipping other entries', () => {
    expect(partitionsOf('nbd0', roots)).toEqual(['nbd0p1', 'nbd0p2', 'nbd0p10']);
    expect(partitionsOf('nbd9', roots)).toEqual([]);
  });
});

describe('deviceUsers', () => {
  it('is empty for a device nobody uses', () => {
    expect(deviceUsers('nbd0', roots)).toEqual([]);
  });

  it('names mounts of the disk and of partitions, unescaping the mount point', () => {
    put(join(roots.proc, 'self/mountinfo'), ['22 1 8:1 / / rw - ext4 /dev/sda1 rw', '40 22 43:2 / /mnt/my\\040disk rw - ext4 /dev/nbd0p2 rw', '41 22 43:0 / /srv rw - xfs /dev/nbd0 rw', ''].join('\n'));
    expect(deviceUsers('nbd0', roots)).toEqual(['/dev/nbd0p2 is mounted on /mnt/my disk', '/dev/nbd0 is mounted on /srv']);
  });

  it('names swap and device-mapper holders', () => {
    put(join(roots.proc, 'swaps'), 'Filename\tType\tSize\tUsed\tPriority\n/dev/nbd0p10                            partition\t1024\t0\t-2\n');
    mkdirSync(join(roots.sys, 'block/nbd0/nbd0p1/holders/dm-3'), { recursive: true });
    put(join(roots.sys, 'block/dm-3/dm/name'), 'vg-root\n');
    expect(deviceUsers('nbd0', roots)).toEqual(['/dev/nbd0p10 is in use as swap', "/dev/nbd0p1 is held by dm-3 (device-mapper 'vg-root')"]);
  });

  it('names processes holding it open, but not the pids it is told to ignore', () => {
    for (const [pid, comm, target] of [['100', 'qemu-system-x86', '/dev/nbd0'], ['200', 'nbdd', '/dev/nbd0'], ['300', 'cat', '/dev/sda']]) {
      mkdirSync(join(roots.proc, pid!, 'fd'), { recursive: true });
      put(join(roots.proc, pid!, 'comm'), `${comm}\n`);
      symlinkSync(target!, join(roots.proc, pid!, 'fd', '5'));
    }
    expect(deviceUsers('nbd0', roots, [200])).toEqual(['/dev/nbd0 is open in pid 100 (qemu-system-x86)']);
  });
});
