#!/usr/bin/env node
/**
 * Kernel block-device benchmark (not a test): /dev/nbdN served by `nbdd attach`, /dev/ublkbN served
 * by `nbdd attach --driver ublk`, and /dev/nbdN served by `qemu-nbd --connect`, each on its own copy
 * of the same raw image, in the same VM run (the test/kernel harness: Debian 6.12 under qemu TCG).
 * fio (libaio, direct) runs 4 KiB random read and write at depth 16 and 1 MiB sequential read and
 * write at depth 4, each for BENCH_RUNTIME seconds. Both devices stay attached and the servers
 * alternate job by job, round after round, so a change in the host's load hits both alike; the
 * table gives each server's best round, and the ratios nbdd / qemu-nbd (both over kernel NBD),
 * ublk / qemu-nbd and ublk / nbdd's own NBD device (what the driver choice is worth). Below it, the
 * ratio nbdd / qemu-nbd of each round (the two jobs of a round run back to back, so a slow stretch
 * of the host mostly hits both) and their median. Before the first round every device gets
 * BENCH_WARMUP seconds of mixed 4 KiB and 1 MiB reads and writes, not measured: under TCG, V8's
 * compiler threads took 2.4 s of CPU during the first 5 s job of a cold daemon, so round 1 of the
 * first job measured the JIT. Absolute figures under TCG mean little; the ratio is the point.
 * Both servers use the page cache of the VM (nbdd: raw backend; qemu-nbd: --cache=writeback); the
 * images live on the VM's /tmp (tmpfs).
 *
 * Environment: BENCH_RUNTIME (5) seconds per job, BENCH_WARMUP (3) seconds per device before the
 * rounds, BENCH_SIZE (256M) image size, BENCH_CONNECTIONS (1) nbdd connections (qemu-nbd
 * --connect always uses one), BENCH_UBLK_QUEUES (1) ublk queues, BENCH_ROUNDS (2). Flags: --json
 * prints the raw figures. Needs the kernel tier's tools (scripts/install-test-deps.sh).
 *
 * The CPU columns say where the VM's two vCPUs go: each server's CPU time per request (all its
 * threads, and its main thread alone, from /proc) and the whole VM's busy time per request.
 *
 * Looking inside nbdd (these change what is measured; use them to find hot spots, not for ratios):
 * BENCH_JOBS (a regular expression on job names) runs only some jobs; BENCH_SERVERS (a comma list
 * of nbdd, ublk, qemu-nbd) runs only some servers. BENCH_PROFILE=1 starts the daemon under `node --cpu-prof` (sampling every
 * BENCH_PROFILE_INTERVAL µs, default 5000: sampling is costly under TCG) and writes its profile to
 * bench/profiles/ with the jobs' start times (`marks`); summarise one job with
 * `node bench/profile-top.mjs bench/profiles/CPU*.cpuprofile --marks bench/profiles/marks --job nbdd-JOB-1`.
 * BENCH_STRACE=1 counts the daemon's system calls per job (`strace -c -f`) into bench/profiles/;
 * BENCH_THREADS=1 saves each server's CPU ticks per thread (cumulative, at each job's end) there.
 * For experiments: BENCH_NBDD_ENV ("NAME=value ...") is set for the daemon, BENCH_NODE_FLAGS are
 * given to its node instead of nbdd's own (src/core/node-flags.ts).
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { runnerImport } from 'vite';

const runtime = Number(process.env.BENCH_RUNTIME ?? 5);
// nbdd's own node flags: what bin/nbdd's first line gives node (src/core/node-flags.ts).
const NBDD_NODE_FLAGS = readFileSync(new URL('../bin/nbdd', import.meta.url), 'utf8').split('\n')[0].replace(/^#!\/usr\/bin\/env -S node\s*/, '');
const size = process.env.BENCH_SIZE ?? '256M';
const connections = Number(process.env.BENCH_CONNECTIONS ?? 1);
const rounds = Number(process.env.BENCH_ROUNDS ?? 2);
const warmup = Number(process.env.BENCH_WARMUP ?? 3);
const profile = process.env.BENCH_PROFILE === '1';
const strace = process.env.BENCH_STRACE === '1';
const threads = process.env.BENCH_THREADS === '1';
const ublkQueues = Number(process.env.BENCH_UBLK_QUEUES ?? 1);
const SERVERS = ['nbdd', 'ublk', 'ublk-thread', 'qemu-nbd'].filter((s) => (process.env.BENCH_SERVERS ?? 'nbdd,ublk,qemu-nbd').split(',').includes(s));
const jobFilter = new RegExp(process.env.BENCH_JOBS ?? '.');

const ALL_JOBS = [
  { name: '4k-randread-qd16', rw: 'randread', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '4k-randwrite-qd16', rw: 'randwrite', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '1m-read-qd4', rw: 'read', bs: '1M', depth: 4, unit: 'MiB/s' },
  { name: '1m-write-qd4', rw: 'write', bs: '1M', depth: 4, unit: 'MiB/s' },
];
const JOBS = ALL_JOBS.filter((j) => jobFilter.test(j.name));

/** The shell variable suffix of server `s` ($dev_X, $pid_X). */
const shellName = (s) => s.replace('-', '_');

/** One fio job on server `s` (device $dev_X, process $pid_X), round `round`, with its CPU figures. */
const fio = (s, j, round) => {
  const v = shellName(s);
  const tag = `${s}-${j.name}-${round}`;
  return [
    `t0=$(ticks $pid_${v}); m0=$(ticks $pid_${v}/task/$pid_${v}); v0=$(vmticks); mark ${tag}`,
    s === 'nbdd' && strace ? `strace -c -f -o $WORK/strace-${tag} -p $pid_nbdd & st=$!; sleep 1` : '',
    `fio --name=${j.name} --filename=$dev_${v} --direct=1 --ioengine=libaio --iodepth=${j.depth} --rw=${j.rw} --bs=${j.bs} ` +
      `--time_based --runtime=${runtime} --ramp_time=1 --output-format=json --output=$WORK/fio-${tag}.json`,
    s === 'nbdd' && strace ? 'kill -INT $st; wait $st || true' : '',
    threads ? `for t in /proc/$pid_${v}/task/*; do echo "$(cat $t/comm | tr ' ' _) $(ticks \${t#/proc/})"; done > $WORK/threads-${tag}` : '',
    `echo $(( $(ticks $pid_${v}) - t0 )) $(( $(ticks $pid_${v}/task/$pid_${v}) - m0 )) $(( $(vmticks) - v0 )) > $WORK/cpu-${tag}; mark end`,
  ]
    .filter(Boolean)
    .join('\n');
};

/** Unmeasured mixed I/O on server `s`'s device, so that round 1 does not pay for the daemon's JIT. */
const warmupJob = (s) =>
  `fio --name=warmup --filename=$dev_${shellName(s)} --direct=1 --ioengine=libaio --iodepth=8 --rw=randrw ` +
  `--bssplit=4k/50:1M/50 --time_based --runtime=${warmup} > /dev/null`;

const script = `
set -ex
cd /tmp
# Real data everywhere, so reads do not hit holes.
fio --name=fill --filename=nbdd.img --rw=write --bs=1M --size=${size} --ioengine=psync --end_fsync=1 > /dev/null
cp nbdd.img qemu-nbd.img
# CPU ticks (utime + stime, all threads) of /proc/$1; busy ticks of the whole VM (all but idle and
# iowait); job boundaries on CLOCK_MONOTONIC (= /proc/uptime here, the clock of V8's profiles).
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
vmticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> $WORK/marks; }
getconf CLK_TCK > $WORK/hz
${
  SERVERS.includes('nbdd')
    ? `# The daemon is started with this node's own flags (process.execArgv).
${process.env.BENCH_NBDD_ENV ?? ''} node ${process.env.BENCH_NODE_FLAGS ?? NBDD_NODE_FLAGS} ${profile ? `--cpu-prof --cpu-prof-dir=$WORK --cpu-prof-interval=${process.env.BENCH_PROFILE_INTERVAL ?? 5000} ` : ''}$REPO/bin/nbdd attach nbdd.img --name bench --connections ${connections} --json > attach.json
dev_nbdd=$(sed 's/.*"device":"\\([^"]*\\)".*/\\1/' attach.json)
pid_nbdd=$(sed 's/.*"pid":\\([0-9]*\\).*/\\1/' attach.json)`
    : ''
}
${
  SERVERS.includes('ublk')
    ? `cp nbdd.img ublk.img
${process.env.BENCH_UBLK_ENV ?? ''} $REPO/bin/nbdd attach ublk.img --driver ublk --name bench-ublk --queues ${ublkQueues} --json > attach-ublk.json
dev_ublk=$(sed 's/.*"device":"\\([^"]*\\)".*/\\1/' attach-ublk.json)
pid_ublk=$(sed 's/.*"pid":\\([0-9]*\\).*/\\1/' attach-ublk.json)`
    : ''
}
${
  SERVERS.includes('ublk-thread')
    ? `cp nbdd.img ublk-thread.img
$REPO/bin/nbdd attach ublk-thread.img --driver ublk --queue-threads --name bench-ublk-thread --queues ${ublkQueues} --json > attach-ublk-thread.json
dev_ublk_thread=$(sed 's/.*"device":"\\([^"]*\\)".*/\\1/' attach-ublk-thread.json)
pid_ublk_thread=$(sed 's/.*"pid":\\([0-9]*\\).*/\\1/' attach-ublk-thread.json)`
    : ''
}
${
  SERVERS.includes('qemu-nbd')
    ? `dev_qemu_nbd=/dev/nbd3
qemu-nbd --connect=$dev_qemu_nbd --format=raw --cache=writeback qemu-nbd.img
sleep 1
pid_qemu_nbd=$(pgrep -n qemu-nbd)`
    : ''
}
${warmup > 0 ? SERVERS.map((s) => warmupJob(s)).join('\n') : ''}
${Array.from({ length: rounds }, (_, round) => JOBS.map((j) => SERVERS.map((s) => fio(s, j, round + 1)).join('\n')).join('\n')).join('\n')}
${SERVERS.includes('qemu-nbd') ? 'qemu-nbd --disconnect $dev_qemu_nbd' : ''}
${SERVERS.includes('ublk') ? '$REPO/bin/nbdd detach bench-ublk' : ''}
${SERVERS.includes('ublk-thread') ? '$REPO/bin/nbdd detach bench-ublk-thread' : ''}
${
  SERVERS.includes('nbdd')
    ? `$REPO/bin/nbdd detach bench
# The daemon writes its profile when it exits.
while kill -0 $pid_nbdd 2>/dev/null; do sleep 0.2; done`
    : ''
}
`;

const { module: vm } = await runnerImport(new URL('../test/kernel/vm.ts', import.meta.url).pathname);
process.stderr.write(`kernel bench: booting the VM (${JOBS.length * SERVERS.length * rounds} fio jobs of ${runtime} s)\n`);
const r = await vm.runInVm(script, { timeoutMs: 900_000 + rounds * JOBS.length * SERVERS.length * (runtime + 5) * 1000 });
if (r.exitCode !== 0) {
  process.stderr.write(vm.describeRun(r));
  process.exit(1);
}

const hz = Number(r.files.get('hz').toString());

/**
 * One run of a job: the throughput figure and CPU µs per request over the whole job, ramp time
 * included — the server's (all threads, and its main thread) and the whole VM's.
 */
const run = (s, job, round) => {
  const tag = `${s}-${job.name}-${round}`;
  const j = JSON.parse(r.files.get(`fio-${tag}.json`).toString()).jobs[0];
  const side = job.rw.includes('read') ? j.read : j.write;
  // fio's counts exclude the ramp; scale by the measured IOPS over runtime + ramp.
  const requests = side.iops * (runtime + 1);
  const [all, main, vmBusy] = r.files.get(`cpu-${tag}`).toString().trim().split(' ').map((t) => ((Number(t) / hz) * 1e6) / requests);
  return { figure: job.unit === 'IOPS' ? side.iops : side.bw_bytes / 1048576, cpuUs: { all, main, vm: vmBusy } };
};
const best = (s, job) => {
  const runs = Array.from({ length: rounds }, (_, i) => run(s, job, i + 1));
  return { ...runs.reduce((a, b) => (b.figure > a.figure ? b : a)), rounds: runs.map((x) => x.figure) };
};
const none = { figure: NaN, cpuUs: { all: NaN, main: NaN, vm: NaN }, rounds: [] };
/** `a`'s figure over `b`'s, round by round (the jobs of one round ran back to back). */
const perRound = (a, b) => a.rounds.map((x, i) => x / b.rounds[i]).filter(Number.isFinite);
const median = (xs) => {
  const v = [...xs].sort((p, q) => p - q);
  return v.length === 0 ? NaN : v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};
const rows = JOBS.map((job) => {
  const nbdd = SERVERS.includes('nbdd') ? best('nbdd', job) : none;
  const ublk = SERVERS.includes('ublk') ? best('ublk', job) : none;
  const qemu = SERVERS.includes('qemu-nbd') ? best('qemu-nbd', job) : none;
  const ublkThread = SERVERS.includes('ublk-thread') ? best('ublk-thread', job) : none;
  return {
    job: job.name,
    unit: job.unit,
    nbdd,
    ublk,
    'qemu-nbd': qemu,
    ratio: nbdd.figure / qemu.figure,
    ratioPerRound: perRound(nbdd, qemu),
    ublkRatio: ublk.figure / qemu.figure,
    ublkRatioPerRound: perRound(ublk, qemu),
    ublkVsNbd: ublk.figure / nbdd.figure,
    ...(SERVERS.includes('ublk-thread') ? { 'ublk-thread': ublkThread, ublkThreadVsNbd: ublkThread.figure / nbdd.figure } : {}),
  };
});

const saved = [...r.files.keys()].filter((f) => f.endsWith('.cpuprofile') || f.startsWith('strace-') || f.startsWith('threads-') || (profile && f === 'marks'));
if (saved.length > 0) {
  const dir = new URL('./profiles/', import.meta.url).pathname;
  mkdirSync(dir, { recursive: true });
  for (const f of saved) writeFileSync(dir + f, r.files.get(f));
  process.stderr.write(`kernel bench: ${saved.length} profile file(s) in ${dir}\n`);
}

if (process.argv.includes('--json')) {
  process.stdout.write(`${JSON.stringify({ runtime, size, connections, rounds, rows }, null, 2)}\n`);
} else {
  const num = (v, w) => (Number.isFinite(v) ? v.toFixed(0) : '-').padStart(w);
  const cpu = (c) => `${num(c.all, 6)} /${num(c.main, 6)} /${num(c.vm, 6)}`;
  const ratio = (v) => (Number.isFinite(v) ? v.toFixed(2) : '-').padStart(7);
  process.stdout.write(
    `kernel devices in a TCG VM, ${size} raw image, ${runtime} s per job, best of ${rounds} round(s), nbdd ${connections} connection(s), ublk ${ublkQueues} queue(s)\n` +
      `${'job'.padEnd(20)}${'unit'.padEnd(7)}${'nbdd'.padStart(8)}${'ublk'.padStart(8)}${'qemu-nbd'.padStart(10)}${'nbd/q'.padStart(7)}${'ublk/q'.padStart(7)}${'ublk/nbd'.padStart(9)}` +
      `   CPU µs/request (server all threads / main thread / whole VM): nbdd | ublk | qemu-nbd\n`,
  );
  for (const row of rows) {
    process.stdout.write(
      `${row.job.padEnd(20)}${row.unit.padEnd(7)}${num(row.nbdd.figure, 8)}${num(row.ublk.figure, 8)}${num(row['qemu-nbd'].figure, 10)}${ratio(row.ratio)}${ratio(row.ublkRatio)}${ratio(row.ublkVsNbd).padStart(9)}` +
        `   ${cpu(row.nbdd.cpuUs)} | ${cpu(row.ublk.cpuUs)} | ${cpu(row['qemu-nbd'].cpuUs)}\n`,
    );
    const t = row['ublk-thread'];
    if (t) process.stdout.write(`${''.padEnd(20)}ublk with queue threads: ${num(t.figure, 8)} ${row.unit}, ${ratio(row.ublkThreadVsNbd)} of nbd   CPU ${cpu(t.cpuUs)}\n`);
  }
  const roundsText = (xs) => (xs.length ? `${xs.map((x) => x.toFixed(2)).join(' ')} (median ${median(xs).toFixed(2)})` : '-');
  if (rows.some((row) => row.ratioPerRound.length || row.ublkRatioPerRound.length)) {
    process.stdout.write(`ratio to qemu-nbd in each round, the two jobs back to back:\n`);
    for (const row of rows) process.stdout.write(`${row.job.padEnd(20)}nbdd ${roundsText(row.ratioPerRound)}   ublk ${roundsText(row.ublkRatioPerRound)}\n`);
  }
}
