/**
 * A mounted ext4 filesystem on a qcow2 image survives SIGKILL of the daemon: fio writes a verified
 * file inside the filesystem (fresh qcow2 clusters are allocated while it runs), the daemon is
 * killed mid-job, `nbdd attach --device` takes the device over, and the job's verify pass reads
 * back every block it wrote — so no write the old daemon acknowledged was lost, allocations
 * included. Afterwards the filesystem is still usable and checks clean, and so does the image.
 */
import { beforeAll, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

let s: Scenario;

interface FioJob {
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

beforeAll(async () => {
  s = await Scenario.run(`
nbdd attach /tmp/fs.qcow2 --create 128M --name fs --device /dev/nbd2 --connections 2 --timeout 5 --dead-conn-timeout 120 > /dev/null
mkfs.ext4 -q /dev/nbd2 && mkdir -p /mnt/fs && mount /dev/nbd2 /mnt/fs
echo before > /mnt/fs/before && sync
# ext4 fallocates the file (unwritten extents), so the job's writes reach fresh qcow2 clusters.
fio --name=fs --filename=/mnt/fs/data --size=24M --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite \\
  --verify=crc32c --verify_fatal=1 --rate_iops=400 --output-format=json --output=$WORK/fs.fio.json & fio=$!
sleep 6
kill -0 $fio && echo running > $WORK/fio-running-at-kill
old=$(daemon_pid nbd2); kill -9 $old; echo $old > $WORK/killed-pid
sleep 1
record reattach nbdd attach /tmp/fs.qcow2 --device /dev/nbd2 --json
wait $fio; echo $? > $WORK/fs.fio.rc
echo after > /mnt/fs/after && sync && cat /mnt/fs/before /mnt/fs/after > $WORK/files
umount /mnt/fs; echo $? > $WORK/umount.rc
fsck.ext4 -fn /dev/nbd2 > $WORK/fsck.out 2>&1; echo $? > $WORK/fsck.rc
nbdd detach fs; echo $? > $WORK/detach.rc
qemu-img check /tmp/fs.qcow2 > $WORK/check.out 2>&1; echo $? > $WORK/check.rc
cp /run/nbdd/fs.log $WORK/fs.log
`);
}, 1_800_000); // may wait for other VM runs (one at a time)

it('the daemon was killed while fio was writing, and the device was taken over', () => {
  expect(s.text('fio-running-at-kill').trim(), s.log).toBe('running');
  expect(s.text('killed-pid').trim()).toMatch(/^\d+$/);
  expect(s.status('reattach'), s.text('reattach.err')).toBe(0);
  expect(s.json('reattach.out')).toMatchObject({ device: '/dev/nbd2', name: 'fs', reattached: true });
});

it('fio verifies every block it wrote, before and after the kill', () => {
  expect(s.text('fs.fio.rc').trim(), s.text('fs.fio.json')).toBe('0');
  const job = s.json<{ jobs: FioJob[] }>('fs.fio.json').jobs[0]!;
  expect(job.error).toBe(0);
  expect(job.write.io_bytes).toBe(24 << 20);
  expect(job.read.io_bytes).toBe(24 << 20); // the verify pass read everything back
});

it('the filesystem stays usable and checks clean; the image has no corruption', () => {
  expect(s.text('files')).toBe('before\nafter\n');
  expect(s.text('umount.rc').trim()).toBe('0');
  expect(s.text('fsck.rc').trim(), s.text('fsck.out')).toBe('0');
  expect(s.text('detach.rc').trim()).toBe('0');
  // The killed daemon's allocation pool may remain as leaked clusters (exit 3); nothing worse.
  expect(['0', '3'], s.text('check.out')).toContain(s.text('check.rc').trim());
  expect(s.text('check.out')).not.toMatch(/ERROR|(?<!No )errors were found|corrupted/);
});
