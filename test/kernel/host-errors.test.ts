/**
 * On the host, whose kernel has neither the nbd module nor ublk_drv: every command that needs a
 * driver says so with the fix (modprobe nbd / modprobe ublk_drv) and exits non-zero, and bad
 * ublk arguments are refused before anything is touched. (The VM tests cover the drivers.)
 */
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { NbdControl } from '../../src/kernel/nbd-control.js';
import { GenlSocket } from '../../src/sys/netlink-socket.js';
import { NBDD, runStatus } from '../helpers/tools.js';

describe('without the nbd kernel module', () => {
  it('the host really lacks it (otherwise this tier checks nothing here)', () => {
    expect(existsSync('/sys/module/nbd'), 'the host has nbd loaded; run these checks on a host without it').toBe(false);
  });

  it('the socket layer talks to the host kernel: nlctrl resolves itself (id 0x10, group notify)', () => {
    const sock = GenlSocket.open();
    try {
      const fam = sock.resolveFamily('nlctrl');
      expect(fam.id).toBe(0x10);
      expect(fam.groups.has('notify')).toBe(true);
    } finally {
      sock.close();
    }
  });

  it('NbdControl.open turns ENOENT from the family lookup into the modprobe advice', () => {
    expect(() => NbdControl.open()).toThrow(expect.objectContaining({ message: 'the nbd kernel module is not loaded: modprobe nbd', code: 'ENODEV' }));
  });

  it.each([
    ['attach', ['attach', 'memory:16M', '--foreground']],
    ['list', ['list']],
    ['detach', ['detach', '/dev/nbd0']],
  ])('%s names modprobe nbd', (_name, args) => {
    const r = runStatus(NBDD, args);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('nbdd: the nbd kernel module is not loaded: modprobe nbd');
  });
});

describe('without ublk_drv', () => {
  it('the host really lacks it', () => {
    expect(existsSync('/dev/ublk-control'), 'the host has ublk_drv loaded; run these checks on a host without it').toBe(false);
  });

  it.each([
    ['attach --driver ublk (foreground)', ['attach', 'memory:16M', '--driver', 'ublk', '--foreground'], 'nbdd: the ublk driver is not loaded: /dev/ublk-control is missing (modprobe ublk_drv'],
    ['attach --driver ublk (daemon)', ['attach', 'memory:16M', '--driver', 'ublk'], 'nbdd: the ublk driver is not loaded: /dev/ublk-control is missing (modprobe ublk_drv'],
    ['attach --device /dev/ublkb0 (driver from the path)', ['attach', 'memory:16M', '--device', '/dev/ublkb0', '--foreground'], 'modprobe ublk_drv'],
    ['detach /dev/ublkb0', ['detach', '/dev/ublkb0'], 'nbdd: no ublk device /dev/ublkb0: the ublk driver is not loaded (modprobe ublk_drv)'],
    ['attach --driver ublk --device /dev/sda', ['attach', 'memory:16M', '--driver', 'ublk', '--device', '/dev/sda'], "nbdd: --device '/dev/sda' is not /dev/ublkbN"],
    ['--depth 0', ['attach', 'memory:16M', '--driver', 'ublk', '--depth', '0'], "'0' is invalid. 0 is not between 1 and 4096"],
    ['--queues 65', ['attach', 'memory:16M', '--driver', 'ublk', '--queues', '65'], "'65' is invalid. 65 is not between 1 and 64"],
    ['--driver bogus', ['attach', 'memory:16M', '--driver', 'bogus'], 'Allowed choices are nbd, ublk, auto'],
  ])('%s', (_name, args, message) => {
    const r = runStatus(NBDD, args);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain(message);
  });

  it('a ublk-only option (--queues) chooses ublk for the default driver, and so names modprobe ublk_drv', () => {
    const r = runStatus(NBDD, ['attach', 'memory:16M', '--queues', '2', '--foreground']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('nbdd: the ublk driver is not loaded: /dev/ublk-control is missing (modprobe ublk_drv');
  });

  it('--driver auto falls back to nbd (and so names modprobe nbd)', () => {
    const r = runStatus(NBDD, ['attach', 'memory:16M', '--driver', 'auto', '--foreground']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('nbdd: the nbd kernel module is not loaded: modprobe nbd');
  });
});
