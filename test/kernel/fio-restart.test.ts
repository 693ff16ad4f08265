/**
 * Data integrity under load: fio --verify=crc32c on a raw image over several connections, and the
 * daemon killed with SIGKILL in the middle of a verified write job, then re-attached: the kernel
 * holds the I/O, the new daemon (started by --name alone, as systemd's Restart= does) RECONFIGUREs
 * the device, and the job finishes without errors.
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
nbdd detach multi; echo $? > $WORK/multi.detach.rc
wait $fg; echo $? > $WORK/multi.exit

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
rdev=$(nbdd attach 'nbd+unix:///?socket=/tmp/remote.sock' --name remote --reconnect-delay 60)
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
`);
}, 1_800_000); // may wait for other VM runs (one at a time)

it('fio --verify=crc32c over 4 connections: one hardware queue per connection (blk-mq caps at the CPU count), no errors', () => {
  expect(Number(s.text('multi.hwqueues')), s.log).toBe(Math.min(4, Number(s.text('nproc'))));
  expect(s.text('multi.fio.rc').trim(), s.text('multi.fio.json')).toBe('0');
  const job = fioJob('multi.fio.json');
  expect(job.error).toBe(0);
  expect(job.write.io_bytes).toBe(32 << 20);
  expect(job.read.io_bytes).toBe(32 << 20); // the verify pass read everything back
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

it('the LINK_DEAD notification for the killed daemon reaches a multicast listener', () => {
  expect(s.text('link-dead').split('\n')).toContain('1');
});
