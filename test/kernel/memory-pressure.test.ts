/**
 * A device that survives memory pressure on itself: in a 1 GiB VM with 55 % of its memory held by
 * another process, buffered writes through ext4 on a qcow2 image attached by nbdd — the page
 * cache can only be cleaned by writing back to the very device nbdd serves. qemu-nbd --connect
 * runs the same job in the same boot as the reference; the host runs a CPU hog beside the VM the
 * whole time. nbdd must finish close to qemu-nbd's time (target 1.2×, gate 2×: see GATE), and the file's checksum must match
 * after a remount. (128 MiB rather than 1 GiB: past the dirty limits of what is left free, so
 * writeback runs under pressure, in a few minutes of emulation.)
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

const WRITE_MB = 128;
let s: Scenario;
let hog: ChildProcess | null = null;

beforeAll(async () => {
  hog = spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore' }); // a CPU hog beside the VM
  s = await Scenario.run(
    `
hold=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 55 / 100 / 1024 ))
echo $hold > $WORK/held-mb
node -e "
  const held = [];
  for (let i = 0; i < $hold; i++) held.push(Buffer.alloc(1 << 20, i & 255));
  require('fs').writeFileSync('$WORK/hog.ready', String(held.length));
  setInterval(() => held.length, 1e6);
" & hog=$!
for i in $(seq 600); do [ -e $WORK/hog.ready ] && break; sleep 0.2; done
grep -E 'MemTotal|MemFree|MemAvailable' /proc/meminfo > $WORK/meminfo

# ${WRITE_MB} MiB, every MiB different (a numbered copy of one random MiB): cheap to make under emulation.
head -c 1M /dev/urandom > /tmp/mib
data() { for i in $(seq ${WRITE_MB}); do printf '%08d' $i; tail -c +9 /tmp/mib; done; }

# job NAME ATTACH DETACH [verify]: ext4 on the device, ${WRITE_MB} MiB of buffered writes and sync
# timed; with "verify", unmount, drop the page cache and mount again, so the checksum of the file
# is read back from the device; then unmount and detach.
job() {
  local name=$1 attach=$2 detach=$3 verify=$4 dev
  dev=$($attach) || return 1
  echo $dev > $WORK/$name.dev
  mkfs.ext4 -q $dev && mkdir -p /mnt/$name && mount $dev /mnt/$name || return 1
  local t0; t0=$(date +%s%N)
  data | tee /mnt/$name/file | cksum > $WORK/$name.sum-written
  sync
  echo $(( ($(date +%s%N) - t0) / 1000000 )) > $WORK/$name.ms
  if [ "$verify" = verify ]; then
    umount /mnt/$name && echo 3 > /proc/sys/vm/drop_caches && mount $dev /mnt/$name || return 1
    cksum < /mnt/$name/file > $WORK/$name.sum-read
  fi
  umount /mnt/$name && $detach $dev
}
nbdd_attach() { nbdd attach $WORK/nbdd.qcow2 --create 1G --name mp; }
nbdd_detach() { nbdd detach mp; }
qemu_attach() { qemu-nbd --connect=/dev/nbd1 -f qcow2 --cache=writeback $WORK/qemu.qcow2 && echo /dev/nbd1; }
qemu_detach() { qemu-nbd --disconnect $1 > /dev/null; sleep 1; }
qemu-img create -q -f qcow2 $WORK/qemu.qcow2 1G
job nbdd nbdd_attach nbdd_detach verify; echo $? > $WORK/nbdd.rc
cp /run/nbdd/mp.log $WORK/nbdd.daemon.log 2>/dev/null
job qemu qemu_attach qemu_detach; echo $? > $WORK/qemu.rc
dmesg | grep -iE 'nbd|hung|oom|timed out' > $WORK/dmesg.txt
kill $hog
`,
    { memoryMb: 1024, timeoutMs: 600_000 },
  );
}, 1_800_000); // may wait for other VM runs (one at a time)

afterAll(() => {
  hog?.kill('SIGKILL');
});

it('holds 55 % of the VM memory in another process during the runs', () => {
  expect(Number(s.text('hog.ready'))).toBe(Number(s.text('held-mb')));
  expect(Number(s.text('held-mb'))).toBeGreaterThan(450);
});

it('nbdd: the job finishes, and after a remount the file reads back with the checksum it was written with', () => {
  expect(s.status('nbdd'), `${s.text('dmesg.txt')}\n${s.log}`).toBe(0);
  expect(s.text('nbdd.sum-written').trim()).toMatch(new RegExp(`^\\d+ ${WRITE_MB * 1024 * 1024}$`));
  expect(s.text('nbdd.sum-read')).toBe(s.text('nbdd.sum-written'));
});

it('qemu-nbd --connect (the reference) finishes the same job', () => {
  expect(s.status('qemu'), `${s.text('dmesg.txt')}\n${s.log}`).toBe(0);
});

/**
 * The target is 1.2× of qemu-nbd. Single runs under emulation on a shared 2-core host measured
 * 0.41, 0.89, 1.12, 1.12, 1.24 and 1.43 (both servers run the same job one after the other, nbdd
 * first, and the host's other tests come and go), so the gate is 2×: wide enough not to fail on noise,
 * narrow enough to catch the reclaim stall this test exists for (a run that does not finish, or
 * takes several times as long). The ratio is printed for the record.
 */
const GATE = 2;

it('nbdd finishes within 2× of qemu-nbd --connect under the same pressure (target 1.2×), with no dead-connection errors', () => {
  const nbdd = Number(s.text('nbdd.ms'));
  const qemu = Number(s.text('qemu.ms'));
  console.log(`memory pressure, ${WRITE_MB} MiB buffered writes + sync: nbdd ${nbdd} ms, qemu-nbd ${qemu} ms (ratio ${(nbdd / qemu).toFixed(2)})`);
  expect(nbdd / qemu, s.text('dmesg.txt')).toBeLessThanOrEqual(GATE);
  expect(s.text('dmesg.txt')).not.toMatch(/Dead connection|Connection timed out|hung_task|Out of memory/i);
});
