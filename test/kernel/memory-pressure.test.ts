/**
 * A device that survives memory pressure on itself: in a 1 GiB VM with 55 % of its memory held by
 * another process, buffered writes through ext4 on a qcow2 image attached by nbdd — the page
 * cache can only be cleaned by writing back to the very device nbdd serves. qemu-nbd --connect,
 * attached beside it in the same boot, runs the same job as the reference, the two taking turns;
 * the host runs a CPU hog beside the VM the whole time. nbdd must finish close to qemu-nbd's time
 * (target 1.2×, gate 2×: see GATE), and its files' checksums must match after a remount.
 * (128 MiB per round rather than 1 GiB: past the dirty limits of what is left free, so writeback
 * runs under pressure, in a few minutes of emulation.)
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

# Both devices are attached and mounted side by side: nbdd on /dev/nbd0, qemu-nbd on /dev/nbd1.
# write NAME FILE: ${WRITE_MB} MiB of buffered writes into a new file on NAME's filesystem and sync,
# timed (milliseconds appended to $WORK/NAME.ms, one line per round).
setup() {
  local name=$1 dev=$2
  echo $dev > $WORK/$name.dev
  mkfs.ext4 -q $dev && mkdir -p /mnt/$name && mount $dev /mnt/$name
}
write() {
  local name=$1 file=$2 t0; t0=$(date +%s%N)
  data | tee /mnt/$name/$file | cksum > $WORK/$name.$file.sum-written || return 1
  sync
  echo $(( ($(date +%s%N) - t0) / 1000000 )) >> $WORK/$name.ms
}
run() {
  local dev
  dev=$(nbdd attach $WORK/nbdd.qcow2 --driver nbd --create 1G --name mp) && setup nbdd $dev || return 1
  qemu-img create -q -f qcow2 $WORK/qemu.qcow2 1G &&
    qemu-nbd --connect=/dev/nbd1 -f qcow2 --cache=writeback $WORK/qemu.qcow2 && setup qemu /dev/nbd1 || return 1
  # Rounds in the order nbdd qemu qemu nbdd: a load on the host that grows or fades during the runs
  # weighs the same on both sums.
  write nbdd f1 && write qemu f1 && write qemu f2 && write nbdd f2 || return 1
  # The checksums of nbdd's files, read back from the device after a remount with no page cache.
  umount /mnt/nbdd && echo 3 > /proc/sys/vm/drop_caches && mount $dev /mnt/nbdd || return 1
  for f in f1 f2; do cksum < /mnt/nbdd/$f > $WORK/nbdd.$f.sum-read; done
  umount /mnt/nbdd && umount /mnt/qemu && nbdd detach mp && qemu-nbd --disconnect /dev/nbd1 > /dev/null
}
run; echo $? > $WORK/run.rc
cp /run/nbdd/mp.log $WORK/nbdd.daemon.log 2>/dev/null
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

it('both jobs finish, and nbdd\'s files read back after a remount with the checksums they were written with', () => {
  expect(s.status('run'), `${s.text('dmesg.txt')}\n${s.log}`).toBe(0);
  for (const f of ['f1', 'f2']) {
    expect(s.text(`nbdd.${f}.sum-written`).trim()).toMatch(new RegExp(`^\\d+ ${WRITE_MB * 1024 * 1024}$`));
    expect(s.text(`nbdd.${f}.sum-read`)).toBe(s.text(`nbdd.${f}.sum-written`));
  }
});

/**
 * The target is 1.2× of qemu-nbd. Single runs under emulation on a shared 2-core host measured
 * 0.41, 0.89, 1.12, 1.12, 1.24, 1.43 and, once in CI with the suite's other files running beside
 * the VM, 2.01 (nbdd ran first, while the host was busiest). The rounds now run nbdd, qemu-nbd,
 * qemu-nbd, nbdd and the gate is on the sums, so a load that comes or goes during the runs counts
 * on both sides; the gate stays 2×: wide enough not to fail on noise, narrow enough to catch the
 * reclaim stall this test exists for (a run that does not finish, or takes several times as long).
 * The ratio is printed for the record.
 */
const GATE = 2;

it('nbdd finishes within 2× of qemu-nbd --connect under the same pressure (target 1.2×), with no dead-connection errors', () => {
  const ms = (name: string) => s.text(`${name}.ms`).trim().split('\n').map(Number);
  const nbdd = ms('nbdd');
  const qemu = ms('qemu');
  expect(nbdd).toHaveLength(2);
  expect(qemu).toHaveLength(2);
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  const ratio = sum(nbdd) / sum(qemu);
  console.log(
    `memory pressure, ${WRITE_MB} MiB buffered writes + sync, rounds nbdd qemu qemu nbdd: ` +
      `nbdd ${nbdd.join(' + ')} ms, qemu-nbd ${qemu.join(' + ')} ms (ratio of sums ${ratio.toFixed(2)})`,
  );
  expect(ratio, s.text('dmesg.txt')).toBeLessThanOrEqual(GATE);
  expect(s.text('dmesg.txt')).not.toMatch(/Dead connection|Connection timed out|hung_task|Out of memory/i);
});
