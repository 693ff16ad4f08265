/**
 * `--metrics`: the Prometheus endpoint of `nbdd serve`, scraped during and after a fio run (fio's
 * nbd engine): the request counters match fio's own counts, the histogram agrees with them,
 * bitmap dirty bytes show, and `promtool check metrics` accepts the output. Hostile scrapers
 * (wrong path or method, a client that never sends) get an answer or nothing, and never stall
 * another scrape.
 */
import { execFileSync, spawn } from 'node:child_process';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/control-client.js';
import { runAsync, runAsyncOk } from '../helpers/run-async.js';
import { NBDD, requireTool, runStatus, serveNbdd, tempDir, type Served } from '../helpers/tools.js';

let dir: ReturnType<typeof tempDir>;
let srv: Served;
let url: string;

beforeAll(async () => {
  for (const t of ['fio', 'promtool', 'curl']) requireTool(t);
  dir = tempDir('nbdd-metrics-');
  const img = join(dir.path, 'disk.raw');
  execFileSync('truncate', ['-s', '64M', img]);
  srv = await serveNbdd(img, ['--metrics', '127.0.0.1:0', '--sidecar', join(dir.path, 'sc'), '--export-name', 'm']);
  url = /metrics at (http:\/\/\S+)/.exec(srv.stderr())?.[1] ?? '';
  expect(url, srv.stderr()).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  const ctl = await ControlClient.connect(join(dir.path, 'sc', 'control.sock'));
  await ctl.call('bitmap.add', { name: 'b0', granularity: 65536 });
  await ctl.close();
});
afterAll(async () => {
  await srv?.stop();
  dir?.remove();
});

/** `name{labels} value` lines → value by `name{sorted labels without device}`. */
function parse(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels = (m[2] ?? '').split(/,(?=\w+=")/).filter((l) => l && !l.startsWith('device=')).sort().join(',');
    out.set(labels ? `${m[1]}{${labels}}` : m[1]!, Number(m[3]));
  }
  return out;
}

async function scrape(): Promise<string> {
  return runAsyncOk('curl', ['-sSf', url], 10_000);
}

function promtool(text: string): { status: number; stdout: string; stderr: string } {
  return runStatus('promtool', ['check', 'metrics'], { input: text });
}

describe('--metrics on nbdd serve', () => {
  it('counts what fio did, during and after the run, in output promtool accepts', async () => {
    const fio = runAsync('fio', ['--name=m', '--ioengine=nbd', `--uri=${srv.uri}`, '--rw=randrw', '--bs=4k', '--size=64M', '--io_size=48M', '--iodepth=8', '--output-format=json'], 120_000);
    // During the run: scrape until requests show up (or fio is done).
    let during = '';
    let done = false;
    void fio.then(() => (done = true));
    while (!done) {
      during = await scrape();
      if ((parse(during).get('nbdd_requests_total{op="write"}') ?? 0) > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const r = await fio;
    expect(r.code, r.stderr).toBe(0);
    const job = (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: { total_ios: number; io_bytes: number }; write: { total_ios: number; io_bytes: number } }[] }).jobs[0]!;
    const after = parse(await scrape());
    const lint = promtool(await scrape());
    expect(lint.status, lint.stdout + lint.stderr).toBe(0);
    if (during) {
      const lintDuring = promtool(during);
      expect(lintDuring.status, lintDuring.stdout + lintDuring.stderr).toBe(0);
      expect(parse(during).get('nbdd_requests_total{op="write"}')).toBeLessThanOrEqual(job.write.total_ios);
    }
    expect(job.read.total_ios + job.write.total_ios).toBe((48 << 20) / 4096);
    // Contiguous reads of one batch reach the layers as one request; the queue counts the others.
    expect(after.get('nbdd_requests_total{op="read"}')! + after.get('nbdd_reads_merged_total')!).toBe(job.read.total_ios);
    expect(after.get('nbdd_requests_total{op="write"}')).toBe(job.write.total_ios);
    expect(after.get('nbdd_request_bytes_total{op="read"}')).toBe(job.read.io_bytes);
    expect(after.get('nbdd_request_bytes_total{op="write"}')).toBe(job.write.io_bytes);
    expect(after.get('nbdd_request_errors_total{op="write"}')).toBe(0);
    expect(after.get('nbdd_request_duration_seconds_count{op="write"}')).toBe(job.write.total_ios);
    expect(after.get('nbdd_request_duration_seconds_bucket{le="+Inf",op="read"}')).toBe(after.get('nbdd_requests_total{op="read"}'));
    expect(after.get('nbdd_queue_depth')).toBe(0);
    expect(after.get('nbdd_device_size_bytes')).toBe(64 << 20);
    // 48 MiB of random 4 KiB writes over 64 MiB dirty nearly every 64 KiB granule.
    expect(after.get('nbdd_bitmap_dirty_bytes{bitmap="b0"}')).toBeGreaterThan(32 << 20);
    expect(after.get('nbdd_fleecing_scratch_bytes{store="memory"}')).toBe(0);
    expect(after.get('process_resident_memory_bytes')).toBeGreaterThan(0);
  }, 180_000);

  it('answers a wrong path with 404 and a wrong method with 405', async () => {
    const notFound = await runAsync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', url.replace('/metrics', '/')]);
    expect(notFound.stdout).toBe('404');
    const post = await runAsync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '-X', 'POST', url]);
    expect(post.stdout).toBe('405');
  });

  it('keeps answering while silent clients hold connections open', async () => {
    const { hostname, port } = new URL(url);
    const idle = Array.from({ length: 8 }, () => connect(Number(port), hostname));
    idle[0]!.write('GET /metrics HTTP/1.1\r\nHost: x\r\n'); // headers never finished
    try {
      const t0 = Date.now();
      expect(parse(await scrape()).get('nbdd_device_size_bytes')).toBe(64 << 20);
      expect(Date.now() - t0).toBeLessThan(5000);
    } finally {
      for (const s of idle) s.destroy();
    }
  });
});

describe('--metrics argument errors', () => {
  it('refuses a malformed address before opening anything', () => {
    const r = runStatus(NBDD, ['serve', 'memory:1M', '--socket', join(dir.path, 'bad.sock'), '--metrics', 'localhost']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/--metrics 'localhost' is not ADDR:PORT/);
  });

  it('fails cleanly, naming the address, when the port is taken', async () => {
    const { port } = new URL(url);
    const child = spawn(NBDD, ['serve', 'memory:1M', '--socket', join(dir.path, 'busy.sock'), '--metrics', `127.0.0.1:${port}`], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (b) => (err += b));
    const code = await new Promise<number | null>((r) => child.once('exit', r));
    expect(code).not.toBe(0);
    expect(err).toMatch(new RegExp(`--metrics 127\\.0\\.0\\.1:${port}: .*EADDRINUSE|address already in use`));
    expect(err).not.toMatch(/\n\s+at /);
  });
});
