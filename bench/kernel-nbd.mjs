#!/usr/bin/env node
/**
 * Kernel NBD benchmark (not a test): /dev/nbdN served by `nbdd attach` against `qemu-nbd --connect`
 * on the same raw image, in the same VM run (the test/kernel harness: Debian 6.12 under qemu TCG).
 * fio (libaio, direct) runs 4 KiB random read and write at depth 16 and 1 MiB sequential read and
 * write at depth 4, each for BENCH_RUNTIME seconds, on each device in turn; the table gives IOPS
 * or MiB/s and the ratio nbdd / qemu-nbd. Absolute figures under TCG mean little; the ratio is the
 * point. Both servers use the page cache of the VM (nbdd: raw backend; qemu-nbd: --cache=writeback).
 *
 * Environment: BENCH_RUNTIME (5) seconds per job, BENCH_SIZE (256M) image size, BENCH_CONNECTIONS
 * (1) nbdd connections (qemu-nbd --connect always uses one). Flags: --json prints the raw figures.
 * Needs the kernel tier's tools (scripts/install-test-deps.sh).
 */
import { runnerImport } from 'vite';

const runtime = Number(process.env.BENCH_RUNTIME ?? 5);
const size = process.env.BENCH_SIZE ?? '256M';
const connections = Number(process.env.BENCH_CONNECTIONS ?? 1);

const JOBS = [
  { name: '4k-randread-qd16', rw: 'randread', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '4k-randwrite-qd16', rw: 'randwrite', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '1m-read-qd4', rw: 'read', bs: '1M', depth: 4, unit: 'MiB/s' },
  { name: '1m-write-qd4', rw: 'write', bs: '1M', depth: 4, unit: 'MiB/s' },
];

const fio = (dev, tag) =>
  JOBS.map(
    (j) =>
      `fio --name=${j.name} --filename=${dev} --direct=1 --ioengine=libaio --iodepth=${j.depth} --rw=${j.rw} --bs=${j.bs} ` +
      `--time_based --runtime=${runtime} --ramp_time=1 --output-format=json --output=$WORK/${tag}-${j.name}.json`,
  ).join('\n');

const script = `
set -ex
cd /tmp
truncate -s ${size} bench.img
# Real data everywhere, so reads do not hit holes.
fio --name=fill --filename=bench.img --rw=write --bs=1M --size=${size} --ioengine=psync --end_fsync=1 > /dev/null
dev=$(node $REPO/bin/nbdd attach bench.img --name bench --connections ${connections})
${fio('$dev', 'nbdd')}
node $REPO/bin/nbdd detach bench
qemu-nbd --connect=/dev/nbd3 --format=raw --cache=writeback bench.img
sleep 1
${fio('/dev/nbd3', 'qemu-nbd')}
qemu-nbd --disconnect /dev/nbd3
`;

const { module: vm } = await runnerImport(new URL('../test/kernel/vm.ts', import.meta.url).pathname);
process.stderr.write(`kernel bench: booting the VM (${JOBS.length * 2} fio jobs of ${runtime} s)\n`);
const r = await vm.runInVm(script, { timeoutMs: 900_000 });
if (r.exitCode !== 0) {
  process.stderr.write(vm.describeRun(r));
  process.exit(1);
}

const figure = (tag, job) => {
  const j = JSON.parse(r.files.get(`${tag}-${job.name}.json`).toString()).jobs[0];
  const side = job.rw.includes('read') ? j.read : j.write;
  return job.unit === 'IOPS' ? side.iops : side.bw_bytes / 1048576;
};
const rows = JOBS.map((job) => {
  const nbdd = figure('nbdd', job);
  const qemu = figure('qemu-nbd', job);
  return { job: job.name, unit: job.unit, nbdd, 'qemu-nbd': qemu, ratio: nbdd / qemu };
});

if (process.argv.includes('--json')) {
  process.stdout.write(`${JSON.stringify({ runtime, size, connections, rows }, null, 2)}\n`);
} else {
  process.stdout.write(`/dev/nbdN in a TCG VM, ${size} raw image, ${runtime} s per job, nbdd ${connections} connection(s)\n`);
  process.stdout.write(`${'job'.padEnd(20)}${'unit'.padEnd(7)}${'nbdd'.padStart(10)}${'qemu-nbd'.padStart(10)}${'ratio'.padStart(8)}\n`);
  for (const row of rows) {
    process.stdout.write(
      `${row.job.padEnd(20)}${row.unit.padEnd(7)}${row.nbdd.toFixed(0).padStart(10)}${row['qemu-nbd'].toFixed(0).padStart(10)}${row.ratio.toFixed(2).padStart(8)}\n`,
    );
  }
}
