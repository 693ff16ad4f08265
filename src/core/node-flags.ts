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
 * `--heap-growing-percent=20`: after a full GC V8 lets the old generation grow to up to 4× what
 * survived before the next one. nbdd's live heap is small (about 8 MB) and what it promotes is
 * garbage of requests in flight, so the old generation filled with 20–30 MB of it between full GCs;
 * at 1.2× the next full GC comes sooner (a few ms of mostly concurrent marking each second under
 * 4 KiB loads) and the peak RSS of `bench/node-flags.sh qcow2` fell from 93–109 to 88–89 MiB with
 * the server's CPU per request within noise (docs/performance.md).
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=4', '--heap-growing-percent=20'];
