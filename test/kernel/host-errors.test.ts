/**
 * On the host, whose kernel has no nbd module: every command that needs the driver says so with
 * the fix (modprobe nbd) and exits non-zero. (The VM tests cover the driver itself.)
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
