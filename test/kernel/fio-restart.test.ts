/**
 * Data integrity under load: fio --verify=crc32c on a raw image over several connections, and the
 * daemon killed with SIGKILL in the middle of a verified write job, then re-attached: the kernel
 * holds the I/O, the new daemon (started by --name alone, as systemd's Restart= does) RECONFIGUREs
 * the device, and the job finishes without errors. Then the remote paths on the kernel device: a
 * remote export restarted mid-job, a qcow2 overlay over a remote base (ext4), and TLS to nbdkit.
 */
import { beforeAll, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

let s: Scenario;

interface FioJob {
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}
const fioJob = (name: string): FioJob => s.json<{ jobs: FioJob[] }>(name).jobs[0]!;

beforeAll(async () => {
  s = await Scenario.run(`
FIO="fio --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite --verify=crc32c --verify_fatal=1 --output-format=json"

# --foreground (as under systemd): the path appears on stdout once usable; after detach the
# process exits by itself, with status 0.
truncate -s 64M multi.img
nbdd attach multi.img --connections 4 --name multi --foreground > $WORK/multi.stdout & fg=$!
for i in $(seq 600); do [ -s $WORK/multi.stdout ] && break; sleep 0.2; done
dev=$(cat $WORK/multi.stdout)
ls /sys/block/\${dev#/dev/}/mq | wc -l > $WORK/multi.hwqueues; nproc > $WORK/nproc
$FIO --name=multi --filename=$dev --size=32M --output=$WORK/multi.fio.json; echo $? > $WORK/multi.fio.rc
# Large writes, whose payloads nbdd splices from the driver's sockets into the image: 1 MiB ones,
# checked through the device and then in the image file itself (after detach), and 64 KiB–1 MiB
# ones at random offsets, checked through the device.
BIG="fio --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 --output-format=json --size=16M"
$BIG --direct=1 --name=big --filename=$dev --offset=32M --rw=write --bs=1M --output=$WORK/big.fio.json; echo $? > $WORK/big.fio.rc
$BIG --direct=1 --name=mixed --filename=$dev --offset=48M --rw=randwrite --bsrange=64k-1m --output=$WORK/mixed.fio.json; echo $? > $WORK/mixed.fio.rc
nbdd detach multi; echo $? > $WORK/multi.detach.rc
wait $fg; echo $? > $WORK/multi.exit
$BIG --name=big --filename=multi.img --offset=32M --rw=write --bs=1M --verify_only --output=$WORK/big-file.fio.json; echo $? > $WORK/big-file.fio.rc

# A LINK_DEAD listener (the daemon's own class) records notifications while the daemon dies.
node --input-type=module -e "
  const m = await import('$REPO/dist/kernel/nbd-control.js');
  const fs = await import('node:fs');
  const c = m.NbdControl.open();
  m.LinkDeadListener.forControl(c, (i) => fs.appendFileSync('$WORK/link-dead', i + '\\\\n'));
  setTimeout(() => process.exit(0), 60000);
" & listener=$!

truncate -s 64M kill.img
nbdd attach kill.img --device /dev/nbd1 --connections 2 --timeout 5 --dead-conn-timeout 120 --name kill > /dev/null
$FIO --name=kill --filename=/dev/nbd1 --size=40M --rate_iops=1000 --output=$WORK/kill.fio.json & fio=$!
sleep 5
kill -0 $fio && echo running > $WORK/fio-running-at-kill
old=$(daemon_pid nbd1); kill -9 $old
sleep 1
nbdd list --json > $WORK/list-after-kill.json
# By name only, as systemd's Restart= runs it: the device 'kill' that has no daemon is re-attached.
nbdd attach kill.img --name kill --json > $WORK/reattach.json; echo $? > $WORK/reattach.rc
cat /sys/block/nbd1/backend > $WORK/backend-after
record dup-name nbdd attach kill.img --name kill
wait $fio; echo $? > $WORK/kill.fio.rc
nbdd detach kill; echo $? > $WORK/kill.detach.rc
kill $listener
cp /run/nbdd/kill.log $WORK/kill.log

# A remote export whose server is SIGKILLed and restarted mid-job: nbdd (the local end) reconnects
# and the kernel device sees a slow disk, never an I/O error.
truncate -s 64M remote.img
dmesg -C # the kernel log from here on is this part's
nbdkit -f -U /tmp/remote.sock file file=/tmp/remote.img & srv=$!
for i in $(seq 100); do [ -S /tmp/remote.sock ] && break; sleep 0.1; done
rdev=$(nbdd attach 'nbd+unix:///?socket=/tmp/remote.sock' --driver nbd --name remote --reconnect-delay 60)
$FIO --name=remote --filename=$rdev --size=24M --rate_iops=500 --output=$WORK/remote.fio.json & fio=$!
sleep 4
kill -0 $fio && echo running > $WORK/remote-running-at-kill
kill -9 $srv; wait $srv 2>/dev/null
sleep 3
rm -f /tmp/remote.sock
nbdkit -f -U /tmp/remote.sock file file=/tmp/remote.img & srv=$!
wait $fio; echo $? > $WORK/remote.fio.rc
nbdd detach remote; echo $? > $WORK/remote.detach.rc
cp /run/nbdd/remote.log $WORK/remote.log
dmesg | grep -E 'nbd.*(I/O error|timed out)' > $WORK/remote.dmesg
kill $srv

# A qcow2 overlay whose backing file is a remote export, as a kernel device: the ext4 filesystem
# of the remote base mounts, new files land in the overlay, the remote image is unchanged.
mkdir -p rsrc && head -c 3M /dev/urandom > rsrc/from-base.bin
truncate -s 64M rbase.img && mkfs.ext4 -q -F -d rsrc rbase.img
sha256sum < rsrc/from-base.bin > $WORK/rb.base-file.sha
sha256sum < rbase.img > $WORK/rb.remote.before
nbdkit -f -U /tmp/rbase.sock file file=/tmp/rbase.img & rsrv=$!
for i in $(seq 100); do [ -S /tmp/rbase.sock ] && break; sleep 0.1; done
nbdd create -f qcow2 rov.qcow2 -b 'nbd+unix:///?socket=/tmp/rbase.sock' > /dev/null
rdev=$(nbdd attach rov.qcow2 --driver nbd --name rov --allow-remote-backing)
mkdir -p /mnt/rov && mount $rdev /mnt/rov
sha256sum < /mnt/rov/from-base.bin > $WORK/rb.read.sha
head -c 2M /dev/urandom > local.bin && sha256sum < local.bin > $WORK/rb.local.sha && cp local.bin /mnt/rov/
sync && umount /mnt/rov
nbdd detach rov; echo $? > $WORK/rb.detach.rc
rdev=$(nbdd attach rov.qcow2 --driver nbd --name rov --allow-remote-backing) && mount $rdev /mnt/rov
cat /mnt/rov/from-base.bin | sha256sum > $WORK/rb.again-base.sha
cat /mnt/rov/local.bin | sha256sum > $WORK/rb.again-local.sha
umount /mnt/rov && nbdd detach rov
qemu-img check rov.qcow2 > $WORK/rb.check 2>&1; echo $? > $WORK/rb.check.rc # qemu opens the remote base too
kill $rsrv; wait $rsrv 2>/dev/null
sha256sum < rbase.img > $WORK/rb.remote.after

# TLS on the kernel path: nbdd terminates TLS (PSK) to nbdkit --tls=require; the device is plain.
printf 'alice:%s\n' $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n') > /tmp/keys.psk
printf 'alice:%s\n' $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n') > /tmp/wrong.psk
truncate -s 32M tls.img
nbdkit -f --tls=require --tls-psk=/tmp/keys.psk -U /tmp/tls.sock file file=/tmp/tls.img & tsrv=$!
for i in $(seq 100); do [ -S /tmp/tls.sock ] && break; sleep 0.1; done
record tls-wrong nbdd attach 'nbds+unix:///?socket=/tmp/tls.sock&tls-psk-file=/tmp/wrong.psk&tls-username=alice' --driver nbd --name tls-wrong
tdev=$(nbdd attach 'nbds+unix:///?socket=/tmp/tls.sock&tls-psk-file=/tmp/keys.psk&tls-username=alice' --driver nbd --name tls)
head -c 8M /dev/urandom > tls-data.bin
dd if=tls-data.bin of=$tdev bs=1M oflag=direct status=none; echo $? > $WORK/tls.dd.rc
dd if=$tdev bs=1M count=8 iflag=direct status=none | cmp - tls-data.bin; echo $? > $WORK/tls.readback.rc
nbdd detach tls; echo $? > $WORK/tls.detach.rc
kill $tsrv; wait $tsrv 2>/dev/null
head -c 8M tls.img | cmp - tls-data.bin; echo $? > $WORK/tls.remote.rc

# Backups of an attached ext4 disk. The filesystem is frozen around each backup's begin, so each
# point is a clean filesystem; for point 2 it thaws as soon as the backup has begun and takes a
# file while the backup runs, which the point must not have.
truncate -s 96M bk.img
bdev=$(nbdd attach bk.img --driver nbd --name bk)
mkfs.ext4 -q $bdev && mkdir -p /mnt/bk && mount $bdev /mnt/bk
head -c 16M /dev/urandom > /mnt/bk/a.bin && sync
fsfreeze -f /mnt/bk
sha256sum < bk.img > $WORK/bk.at1.sha # the image nbdd serves (the bdev page cache may hold blocks ext4 rewrote since)
nbdd backup bk --repo /tmp/bkrepo --json > $WORK/bk.p1.json; echo $? > $WORK/bk.p1.rc
fsfreeze -u /mnt/bk
head -c 24M /dev/urandom > /mnt/bk/b.bin && sync
fsfreeze -f /mnt/bk
sha256sum < bk.img > $WORK/bk.at2.sha
nbdd backup bk --repo /tmp/bkrepo --json > $WORK/bk.p2.json & job=$!
# The daemon logs each begin; the second one is this backup's (each nbdd call costs ~10 s of
# node startup under TCG, so the log is watched instead of polling nbdd status).
for i in $(seq 1200); do [ "$(grep -c "backup of 'bk' started" /run/nbdd/bk.log)" -ge 2 ] && break; sleep 0.05; done
fsfreeze -u /mnt/bk
head -c 8M /dev/urandom > /mnt/bk/c.bin && sync
kill -0 $job 2>/dev/null && echo running > $WORK/bk.running-after-write
wait $job; echo $? > $WORK/bk.p2.rc
umount /mnt/bk && nbdd detach bk
nbdd verify --repo /tmp/bkrepo > $WORK/bk.verify 2>&1; echo $? > $WORK/bk.verify.rc
nbdd restore --repo /tmp/bkrepo --point 0001 bk-r1.raw && sha256sum < bk-r1.raw > $WORK/bk.r1.sha
nbdd restore --repo /tmp/bkrepo bk-r2.raw && sha256sum < bk-r2.raw > $WORK/bk.r2.sha
# Instant recovery: the point's qcow2 file itself, attached read-only, mounts.
rdev=$(nbdd attach /tmp/bkrepo/0002-inc.qcow2 --driver nbd --name bkr --read-only)
mkdir -p /mnt/bkr && mount -o ro,noload $rdev /mnt/bkr && ls /mnt/bkr > $WORK/bk.r2.ls
umount /mnt/bkr; nbdd detach bkr
`, { timeoutMs: 900_000 }); // four parts of about two minutes each under emulation
}, 1_800_000); // may wait for other VM runs (one at a time)

it('fio --verify=crc32c over 4 connections: one hardware queue per connection (blk-mq caps at the CPU count), no errors', () => {
  expect(Number(s.text('multi.hwqueues')), s.log).toBe(Math.min(4, Number(s.text('nproc'))));
  expect(s.text('multi.fio.rc').trim(), s.text('multi.fio.json')).toBe('0');
  const job = fioJob('multi.fio.json');
  expect(job.error).toBe(0);
  expect(job.write.io_bytes).toBe(32 << 20);
  expect(job.read.io_bytes).toBe(32 << 20); // the verify pass read everything back
});

it('large writes (spliced from the driver\'s sockets) verify through the device, and the 1 MiB ones in the image file itself', () => {
  for (const name of ['big', 'mixed']) {
    expect(s.text(`${name}.fio.rc`).trim(), s.text(`${name}.fio.json`) + s.log).toBe('0');
    const job = fioJob(`${name}.fio.json`);
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(16 << 20);
    expect(job.read.io_bytes).toBe(16 << 20);
  }
  expect(s.text('big-file.fio.rc').trim(), s.text('big-file.fio.json')).toBe('0');
  const file = fioJob('big-file.fio.json');
  expect(file.error).toBe(0);
  expect(file.read.io_bytes).toBe(16 << 20); // fio read and checked every block it wrote through the device
});

it('--foreground prints the device once usable and exits 0 after detach (the image flushed and closed)', () => {
  expect(s.text('multi.stdout'), s.log).toMatch(/^\/dev\/nbd\d+\n$/);
  expect(s.text('multi.detach.rc').trim()).toBe('0');
  expect(s.text('multi.exit').trim()).toBe('0');
});

it('survives SIGKILL of the daemon mid-job: re-attach by RECONFIGURE, fio finishes with no errors', () => {
  expect(s.text('fio-running-at-kill').trim(), s.log).toBe('running');
  const dead = s.json<{ index: number; state: string; daemonPid: number | null }[]>('list-after-kill.json').find((d) => d.index === 1);
  expect(dead).toMatchObject({ state: 'daemon-dead', daemonPid: null });
  expect(s.status('reattach')).toBe(0);
  expect(s.json('reattach.json')).toMatchObject({ device: '/dev/nbd1', name: 'kill', reattached: true });
  expect(s.text('backend-after').trim()).toBe('nbdd:kill');
  expect(s.text('kill.fio.rc').trim(), s.text('kill.fio.json')).toBe('0');
  const job = fioJob('kill.fio.json');
  expect(job.error).toBe(0);
  expect(job.write.io_bytes).toBe(40 << 20);
  expect(job.read.io_bytes).toBe(40 << 20);
  expect(s.text('kill.detach.rc').trim()).toBe('0');
  expect(s.text('kill.log')).toMatch(/re-attached/);
});

it('re-attaches by --name alone (the systemd restart path), and refuses the name while its daemon lives', () => {
  expect(s.status('reattach')).toBe(0);
  expect(s.json('reattach.json')).toMatchObject({ device: '/dev/nbd1', reattached: true });
  expect(s.status('dup-name')).not.toBe(0);
  expect(s.text('dup-name.err')).toMatch(/'kill' is already attached as \/dev\/nbd1 \(nbdd pid \d+\)/);
});

it('a remote export whose server is SIGKILLed and restarted mid-job: nbdd reconnects, fio --verify finishes clean, no I/O error in the kernel log', () => {
  expect(s.text('remote-running-at-kill').trim(), s.log).toBe('running');
  expect(s.text('remote.fio.rc').trim(), s.text('remote.fio.json') + s.text('remote.log')).toBe('0');
  const job = fioJob('remote.fio.json');
  expect(job.error).toBe(0);
  expect(job.write.io_bytes).toBe(24 << 20);
  expect(job.read.io_bytes).toBe(24 << 20);
  expect(s.text('remote.log')).toMatch(/remote-lost: [\s\S]*remote-reconnected: /);
  expect(s.text('remote.dmesg')).toBe('');
  expect(s.text('remote.detach.rc').trim()).toBe('0');
});

it('a qcow2 overlay over a remote base as a kernel device: the base ext4 mounts, writes stay local, the remote image is unchanged (the refusal without --allow-remote-backing: test/interop/remote-backing.test.ts)', () => {
  expect(s.text('rb.read.sha')).toBe(s.text('rb.base-file.sha'));
  expect(s.text('rb.detach.rc').trim()).toBe('0');
  expect(s.text('rb.again-base.sha')).toBe(s.text('rb.base-file.sha'));
  expect(s.text('rb.again-local.sha')).toBe(s.text('rb.local.sha'));
  expect(s.text('rb.remote.after')).toBe(s.text('rb.remote.before'));
  expect(s.text('rb.check.rc').trim(), s.text('rb.check')).toBe('0');
});

it('attach nbds+unix:// terminates TLS in nbdd: bytes written to the device reach the remote; a wrong PSK is refused (plaintext: test/interop/client-tls.test.ts)', () => {
  expect(s.status('tls-wrong')).not.toBe(0);
  expect(s.text('tls-wrong.err')).toMatch(/PSK|key|TLS/i);
  expect(s.text('tls-wrong.err')).not.toMatch(/\n\s+at /);
  expect(s.text('tls.dd.rc').trim()).toBe('0');
  expect(s.text('tls.readback.rc').trim()).toBe('0');
  expect(s.text('tls.detach.rc').trim()).toBe('0');
  expect(s.text('tls.remote.rc').trim()).toBe('0');
});

it('nbdd backup of an attached ext4 disk: each point is the disk at its begin (a file written during the backup is not in it); the point file mounts directly', () => {
  expect(s.text('bk.p1.rc').trim(), s.log).toBe('0');
  expect(s.json('bk.p1.json')).toMatchObject({ point: '0001', kind: 'full' });
  expect(s.text('bk.p2.rc').trim(), s.log).toBe('0');
  const p2 = s.json<{ kind: string; bytesStored: number }>('bk.p2.json');
  expect(p2.kind).toBe('incremental');
  expect(p2.bytesStored).toBeGreaterThanOrEqual(24 << 20);
  expect(p2.bytesStored).toBeLessThan(40 << 20);
  expect(s.text('bk.r1.sha')).toBe(s.text('bk.at1.sha'));
  expect(s.text('bk.r2.sha')).toBe(s.text('bk.at2.sha'));
  expect(s.text('bk.verify.rc').trim(), s.text('bk.verify')).toBe('0');
  expect(s.text('bk.r2.ls').split('\n').filter((f) => f.endsWith('.bin'))).toEqual(['a.bin', 'b.bin']);
});

it('the LINK_DEAD notification for the killed daemon reaches a multicast listener', () => {
  expect(s.text('link-dead').split('\n')).toContain('1');
});
