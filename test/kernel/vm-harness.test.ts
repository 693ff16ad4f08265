/**
 * Proves the VM harness independently of nbdd: the real nbd-client (netlink mode) attaches an
 * `nbdkit memory` export inside the VM, ext4 goes on it, and results come back over 9p.
 */
import { describe, expect, it } from 'vitest';
import { describeRun, runInVm } from './vm.js';

describe('VM harness', () => {
  it('boots the 6.12 kernel with nbd loaded and attaches nbdkit through nbd-client', async () => {
    const r = await runInVm(`
set -euxo pipefail
uname -r > $WORK/uname
test -d /sys/module/nbd
nbdkit -U /tmp/nbd.sock -P /tmp/nbdkit.pid memory 64M
nbd-client -N '' -u /tmp/nbd.sock /dev/nbd0
cat /sys/block/nbd0/size > $WORK/sectors
mkfs.ext4 -q /dev/nbd0
mkdir -p /mnt/t && mount /dev/nbd0 /mnt/t
head -c 4M /dev/urandom > /mnt/t/blob
sha256sum < /mnt/t/blob | cut -d' ' -f1 > $WORK/written
sync; umount /mnt/t; echo 3 > /proc/sys/vm/drop_caches
mount /dev/nbd0 /mnt/t
sha256sum < /mnt/t/blob | cut -d' ' -f1 > $WORK/read
umount /mnt/t
nbd-client -d /dev/nbd0
kill $(cat /tmp/nbdkit.pid)
`);
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.files.get('uname')!.toString()).toMatch(/^6\.12\./);
    expect(Number(r.files.get('sectors')!.toString())).toBe((64 << 20) / 512);
    expect(r.files.get('written')!.toString()).toMatch(/^[0-9a-f]{64}\n$/);
    expect(r.files.get('read')!.toString()).toBe(r.files.get('written')!.toString());
  }, 1_800_000); // may wait for other VM runs (one at a time)
});
