#!/usr/bin/env bash
# Node flags against throughput and peak RSS of `nbdd serve` (not a test): for each round and each
# set of node flags, a fresh 1 GiB image (qcow2 made by qemu-img, or raw filled with data), a fresh
# server, four fio jobs of BENCH_RUNTIME s over the nbd engine — 4k randwrite qd16 twice (on
# qcow2: allocating, then mostly allocated), 1M write qd8, 4k randread qd16 — and the server's
# VmHWM, with the server's CPU time per request (all threads, /proc/PID/stat). Flag sets alternate round by round, so host load weighs on all alike.
#
#   bash bench/node-flags.sh qcow2 "" "--max-semi-space-size=4" "--max-semi-space-size=2"
#
# BENCH_ROUNDS (3), BENCH_RUNTIME (5), BENCH_DIR (/tmp). Needs `npm run build`, fio, qemu-img.
set -euo pipefail
format=$1; shift
flag_sets=("$@")
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-/tmp}; img=$dir/node-flags.$format; sock=$dir/node-flags.sock
runtime=${BENCH_RUNTIME:-5}
for round in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  for flags in "${flag_sets[@]}"; do
    rm -f "$img"
    if [ "$format" = qcow2 ]; then qemu-img create -q -f qcow2 "$img" 1G
    else fio --name=fill --filename="$img" --rw=write --bs=1M --size=1G --ioengine=psync > /dev/null; fi
    # shellcheck disable=SC2086
    node $flags "$root/bin/nbdd" serve "$img" --socket "$sock" > "$dir/node-flags.log" 2>&1 & pid=$!
    while [ ! -S "$sock" ]; do
      kill -0 $pid 2> /dev/null || { echo "nbdd serve failed:"; cat "$dir/node-flags.log"; exit 1; } >&2
      sleep 0.1
    done
    row="round $round [${flags:-no flags}]"
    for job in "randwrite 4k 16" "randwrite 4k 16" "write 1M 8" "randread 4k 16"; do
      read -r rw bs depth <<< "$job"
      t0=$(awk '{print $14 + $15}' /proc/$pid/stat)
      fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" --iodepth="$depth" --size=1G \
        --time_based --runtime="$runtime" --output-format=json --output="$dir/node-flags.json" > /dev/null 2>&1
      t1=$(awk '{print $14 + $15}' /proc/$pid/stat)
      figure=$(node -e '
        const [file, bs, ticks, hz] = process.argv.slice(1);
        const j = JSON.parse(require("fs").readFileSync(file, "utf8")).jobs[0];
        const s = j.read.io_bytes ? j.read : j.write;
        const cpu = ((Number(ticks) / Number(hz)) * 1e6) / s.total_ios;
        const rate = bs === "1M" ? `${Math.round(s.bw_bytes / 1048576)} MiB/s` : `${Math.round(s.iops)} IOPS`;
        console.log(`${rate} ${cpu.toFixed(0)} µs`);
      ' "$dir/node-flags.json" "$bs" $((t1 - t0)) "$(getconf CLK_TCK)")
      row="$row  $rw $bs: $figure"
    done
    echo "$row  peak RSS $(awk '/VmHWM/ {print int($2 / 1024)}' /proc/$pid/status) MiB"
    kill $pid; wait $pid 2>/dev/null || true
    rm -f "$sock"
  done
done
rm -f "$img" "$dir/node-flags.json" "$dir/node-flags.log"
