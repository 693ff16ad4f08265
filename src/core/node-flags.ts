/**
 * The flags node runs nbdd with: the first line of bin/nbdd (`#!/usr/bin/env -S node FLAGS`), and
 * whatever starts nbdd by naming node itself — systemd units (`install-systemd`), the benchmarks.
 * A daemon started by `attach` inherits them (`process.execArgv`). A unit test keeps the two in step.
 *
 * `--max-semi-space-size=4`: V8 grows the young generation's two semi-spaces up to 16 MiB each
 * under nbdd's allocation rate, and that memory stays resident; capped at 4 MiB, peak RSS over
 * `npm run bench`-like loads fell from about 125 to 97 MiB with no loss of throughput measured
 * (docs/performance.md, "Memory"). V8 reads it only at start-up.
 *
 * `--v8-pool-size=1`: one V8 helper thread (GC and compilation) instead of four. Each helper that
 * allocates gets a malloc arena of its own, which keeps what it touched; with one, peak RSS per
 * bench cell is 2.5-4 MiB lower, and scavenges take no longer (docs/performance.md, "Smaller at
 * rest").
 *
 * `--heap-growing-percent=50`: a full collection when the old generation has grown by half since
 * the last one. V8's own factor let it reach two to three times its live size first (garbage of
 * requests that outlived two scavenges): fresh-image 4k writes peaked at 73-88 MiB from run to
 * run, and at 72.3-72.5 with it, for one more full collection (10-15 ms) in 5 s.
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=4', '--v8-pool-size=1', '--heap-growing-percent=50'];
