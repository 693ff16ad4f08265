/**
 * Prometheus metrics of one device (`--metrics ADDR:PORT` on serve and attach): an HTTP endpoint
 * whose `/metrics` is rendered by prom-client's Registry from what the device already counts —
 * the stats layer's per-command counters and latency histogram, the queue depth, each bitmap's
 * dirty bytes, the running backup's scratch bytes, and the link events the frontends publish.
 *
 * Nothing here is on the request path: every value is read at scrape time from a snapshot, so a
 * device with metrics serves requests exactly as fast as one without. prom-client is loaded only
 * for a device that has metrics: it is a tenth of a daemon's memory (about 12 MiB of RSS).
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Metric, Registry } from 'prom-client';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { lazyBuiltin } from '../core/lazy-builtin.js';
import { logger } from '../core/log.js';
import { LATENCY_BUCKETS, STAT_OPS } from '../layers/stats.js';
import type { DeviceRuntime } from './device.js';

/** `node:http`, loaded when a metrics listener starts. */
const nodeHttp = lazyBuiltin<typeof import('node:http')>('node:http');

const log = logger('metrics');

export interface MetricsListen {
  host: string;
  port: number;
}

/** `ADDR:PORT`, `[V6]:PORT`, `:PORT` (all addresses) or `PORT` (127.0.0.1). */
export function parseMetricsAddress(spec: string): MetricsListen {
  const m = /^(?:(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):)?(\d{1,5})$/.exec(spec);
  if (!m || Number(m[3]) > 65535) throw new NbddError(Errno.EINVAL, `--metrics '${spec}' is not ADDR:PORT (e.g. 127.0.0.1:9500, [::1]:9500, :9500)`);
  const host = m[1] ?? (m[2] === undefined ? '127.0.0.1' : m[2] === '' ? '::' : m[2]);
  return { host, port: Number(m[3]) };
}

type Values = { value: number; labels?: Record<string, string | number>; metricName?: string }[];

/**
 * A metric whose values are computed at scrape time. prom-client's Registry formats anything with
 * `get()`; its own Counter/Histogram classes want every event observed as it happens, which the
 * stats layer already does more cheaply.
 */
function snapshotMetric(name: string, help: string, type: 'counter' | 'gauge' | 'histogram', values: () => Values): Metric {
  const metric = {
    name,
    help,
    type,
    aggregator: 'sum' as const,
    get: async () => ({ name, help, type, aggregator: 'sum' as const, values: values() }),
    reset: () => undefined,
  };
  return metric as unknown as Metric;
}

/** Upper bounds of the stats layer's latency buckets, in seconds (bucket i: below 2^i µs). */
const BUCKET_LE = Array.from({ length: LATENCY_BUCKETS }, (_, i) => 2 ** i / 1e6);

/** The device's metrics, in a registry of their own (with the process metrics Node offers). */
export async function deviceRegistry(runtime: DeviceRuntime, name: string): Promise<Registry> {
  const { collectDefaultMetrics, Registry } = await import('prom-client');
  const registry = new Registry();
  registry.setDefaultLabels({ device: name });
  collectDefaultMetrics({ register: registry });
  // Gauges named like counters, which the Prometheus linter (promtool check metrics) rejects.
  for (const misnamed of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(misnamed);
  const { stack, frontend } = runtime;
  const perOp = (pick: (s: ReturnType<typeof stack.stats.snapshot>[(typeof STAT_OPS)[number]]) => number): (() => Values) => () => {
    const snap = stack.stats.snapshot();
    return STAT_OPS.map((op) => ({ labels: { op }, value: pick(snap[op]) }));
  };
  const metrics = [
    snapshotMetric('nbdd_device_info', 'The device: its frontend, image kind and where it is served (always 1)', 'gauge', () => {
      const status = frontend.status();
      const where = status.device ?? status.uri ?? '';
      return [{ value: 1, labels: { frontend: frontend.kind, kind: stack.image.kind, path: String(where), read_only: String(stack.queue.caps.readOnly) } }];
    }),
    snapshotMetric('nbdd_device_size_bytes', 'Size of the device', 'gauge', () => [{ value: stack.queue.size }]),
    snapshotMetric('nbdd_requests_total', 'Requests completed, by command (failed ones included; contiguous reads of one batch count once)', 'counter', perOp((s) => s.count)),
    snapshotMetric('nbdd_reads_merged_total', 'Reads coalesced into the read before them (add to nbdd_requests_total{op="read"} for the reads clients sent)', 'counter', () => [{ value: stack.queue.mergedReads }]),
    snapshotMetric('nbdd_request_errors_total', 'Requests that failed, by command', 'counter', perOp((s) => s.errors)),
    snapshotMetric('nbdd_request_bytes_total', 'Bytes of the requests that succeeded, by command', 'counter', perOp((s) => s.bytes)),
    snapshotMetric('nbdd_request_duration_seconds', 'Time from the queue to completion, by command', 'histogram', () => {
      const snap = stack.stats.snapshot();
      return STAT_OPS.flatMap((op) => {
        const s = snap[op];
        let cumulative = 0;
        const buckets: Values = s.latencyUs.map((n, i) => {
          cumulative += n;
          return { metricName: 'nbdd_request_duration_seconds_bucket', labels: { op, le: i === LATENCY_BUCKETS - 1 ? '+Inf' : BUCKET_LE[i]! }, value: cumulative };
        });
        return [
          ...buckets,
          { metricName: 'nbdd_request_duration_seconds_sum', labels: { op }, value: s.totalUs / 1e6 },
          { metricName: 'nbdd_request_duration_seconds_count', labels: { op }, value: s.count },
        ];
      });
    }),
    snapshotMetric('nbdd_queue_depth', 'Requests queued or in flight', 'gauge', () => [{ value: stack.queue.depth }]),
    snapshotMetric('nbdd_connections', 'Connections the frontend serves (kernel sockets or NBD clients)', 'gauge', () => {
      const c = frontend.status().connections;
      return typeof c === 'number' ? [{ value: c }] : [];
    }),
    snapshotMetric('nbdd_bitmap_dirty_bytes', 'Dirty bytes of each dirty bitmap', 'gauge', () =>
      stack.bitmaps.list().map((b) => ({ labels: { bitmap: b.name }, value: b.dirtyBytes })),
    ),
    snapshotMetric('nbdd_fleecing_scratch_bytes', 'Old data the running backup keeps (copy-before-write), by where it is kept', 'gauge', () => {
      const s = stack.fleecing.active?.stats();
      return [
        { labels: { store: 'memory' }, value: s?.scratchMemoryBytes ?? 0 },
        { labels: { store: 'file' }, value: s?.scratchFileBytes ?? 0 },
      ];
    }),
    snapshotMetric('nbdd_link_dead_total', 'Times every kernel connection of the device was found dead', 'counter', () => [{ value: runtime.eventCount('link-dead') }]),
    snapshotMetric('nbdd_reconnects_total', 'Times dead kernel connections were replaced', 'counter', () => [{ value: runtime.eventCount('reconnected') }]),
  ];
  for (const m of metrics) registry.registerMetric(m);
  return registry;
}

/** The HTTP endpoint: `GET /metrics` in the Prometheus text format; everything else 404. */
export class MetricsServer {
  private constructor(
    private readonly server: Server,
    /** Where it listens (port 0 resolved). */
    readonly url: string,
  ) {}

  static async start(listen: MetricsListen, registry: Registry): Promise<MetricsServer> {
    const server = nodeHttp().createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD' }).end();
        return;
      }
      if (path !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('nbdd: metrics are at /metrics\n');
        return;
      }
      registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
        (err: unknown) => {
          log.warn(`rendering metrics: ${messageOf(err)}`);
          res.writeHead(500, { 'content-type': 'text/plain' }).end(`nbdd: ${messageOf(err)}\n`);
        },
      );
    });
    // A scraper that never reads cannot hold the daemon: idle sockets close, requests have a deadline.
    server.headersTimeout = 10_000;
    server.requestTimeout = 10_000;
    server.keepAliveTimeout = 5_000;
    server.maxConnections = 16;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(new NbddError(err.code === 'EADDRINUSE' ? Errno.EADDRINUSE : Errno.EINVAL, `--metrics ${listen.host}:${listen.port}: ${err.message}`)),
      );
      server.listen(listen.port, listen.host, () => resolve());
    });
    const addr = server.address() as AddressInfo;
    const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    return new MetricsServer(server, `http://${host}:${addr.port}/metrics`);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}
