/**
 * `nbdd serve IMAGE`: serve an image over the NBD protocol on a unix socket or TCP.
 */
import { serverTls, type TlsMode } from '../nbd/tls.js';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Command, Option } from 'commander';
import { logger } from '../core/log.js';
import { formatSize } from '../core/units.js';
import { FORMATS, type Format } from '../backends/open.js';
import { NbdServerFrontend, type Listen } from '../nbd/server/frontend.js';
import { Errno, NbddError } from '../core/errors.js';
import { listenFds, sdNotify } from '../sys/systemd.js';
import { becomeIoFlusher } from '../sys/io-flusher.js';
import { dropStartupPages } from '../sys/startup-pages.js';
import { DeviceRuntime } from '../runtime/device.js';
import { NBD_DEFAULT_PORT } from '../nbd/wire/constants.js';
import type { MetricsListen } from '../runtime/metrics.js';
import { DEFAULT_BITMAP_LIMITS } from '../bitmaps/bitmap-set.js';
import { addRemoteOptions, intArg, MAX_BITMAPS_HELP, METRICS_HELP, metricsArg, remoteOptions, type RemoteCliOptions } from './options.js';
import { MAX_NBD_CONNECTIONS } from '../backends/remote.js';

const log = logger('serve');

interface ServeOptions extends RemoteCliOptions {
  tls: TlsMode;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
  connections: number;
  socket?: string;
  port?: number;
  bind: string;
  format: Format;
  readOnly?: boolean;
  exportName: string;
  description?: string;
  shared: number;
  handshakeTimeout: number;
  idleTimeout: number;
  run?: string;
  direct?: boolean;
  name?: string;
  sidecar?: string;
  bitmapStore?: string;
  bitmap: string[];
  metrics?: MetricsListen;
  maxBitmaps: number;
}

/** Where to listen: --socket, --port, a socket systemd passed (socket activation), or the NBD port. */
function listenOn(opts: ServeOptions, socketPath: string | undefined): Listen {
  if (socketPath) return { socket: socketPath };
  if (opts.port !== undefined) return { host: opts.bind, port: opts.port };
  const passed = listenFds();
  if (passed.length > 1) log.warn(`systemd passed ${passed.length} sockets; serving on the first`);
  if (passed.length > 0) return { fd: passed[0]! };
  return { host: opts.bind, port: NBD_DEFAULT_PORT };
}

async function serve(image: string, opts: ServeOptions): Promise<void> {
  if (opts.socket && opts.port !== undefined) throw new NbddError(Errno.EINVAL, '--socket and --port are exclusive');
  let tempDir: string | undefined;
  let socketPath = opts.socket;
  if (!socketPath && opts.port === undefined && opts.run) {
    tempDir = mkdtempSync(join(tmpdir(), 'nbdd-'));
    socketPath = join(tempDir, 'nbd.sock');
  }
  // A client on this host may make a kernel device of this export (nbd-client): be a flusher too.
  await becomeIoFlusher(false);
  dropStartupPages();
  const tls = serverTls({ mode: opts.tls, certificates: opts.tlsCertificates, psk: opts.tlsPsk, verifyPeer: opts.tlsVerifyPeer });
  const frontend = new NbdServerFrontend({
    tls,
    exportName: opts.exportName,
    description: opts.description,
    readOnly: opts.readOnly,
    maxConnections: opts.shared,
    handshakeTimeoutMs: opts.handshakeTimeout * 1000,
    idleTimeoutMs: opts.idleTimeout * 1000,
    listen: listenOn(opts, socketPath),
    bitmaps: opts.bitmap,
  });
  // The sidecar (block status, bitmaps, control, fleecing) when --name or --sidecar asks for one;
  // the runtime starts it before the frontend, so it is ready once the main socket is.
  const wantSidecar = opts.name !== undefined || opts.sidecar !== undefined;
  let runtime: DeviceRuntime;
  try {
    runtime = await DeviceRuntime.start({
      image,
      stack: { format: opts.format, readOnly: opts.readOnly, direct: opts.direct, ...remoteOptions(opts), connections: opts.connections, bitmapStore: opts.bitmapStore, bitmapLimits: { maxBitmaps: opts.maxBitmaps } },
      frontend,
      metrics: opts.metrics && { listen: opts.metrics, name: opts.name ?? (opts.exportName || basename(image)) },
      sidecar: wantSidecar ? { name: opts.name ?? (opts.exportName || basename(opts.sidecar!)), dir: opts.sidecar } : undefined,
    });
  } catch (err) {
    if (tempDir) rmSync(tempDir, { recursive: true, force: true });
    throw err;
  }
  const { image: info, queue } = runtime.stack;
  const uri = frontend.uri;
  log.info(`serving ${image} (${info.kind}, ${formatSize(info.size)}${queue.caps.readOnly || opts.readOnly ? ', read-only' : ''}) at ${uri}`);
  sdNotify({ READY: 1, STATUS: `serving ${image} at ${uri}`, MAINPID: process.pid });

  let stopping = false;
  const stop = async (code: number): Promise<void> => {
    if (stopping) return;
    stopping = true;
    sdNotify({ STOPPING: 1 });
    await runtime.stop();
    if (tempDir) rmSync(tempDir, { recursive: true, force: true });
    process.exit(code);
  };
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.on(sig, () => {
      if (stopping) process.exit(1);
      log.info(`${sig}: finishing in-flight requests and closing`);
      void stop(0);
    });
  }

  if (opts.run) {
    const child = spawn('/bin/sh', ['-c', opts.run], {
      stdio: 'inherit',
      env: { ...process.env, uri, nbd: uri, ...(socketPath ? { unixsocket: socketPath } : {}), exportname: opts.exportName },
    });
    child.on('exit', (code, signal) => void stop(code ?? (signal ? 128 + 1 : 1)));
    child.on('error', (err) => {
      log.error(`--run: ${err.message}`);
      void stop(1);
    });
  }
}

export function register(program: Command): void {
  const cmd = program
    .command('serve')
    .description('serve an image over the NBD protocol (unix socket or TCP)')
    .argument('<image>', 'image file, block device, or memory:SIZE')
    .option('-k, --socket <path>', 'listen on this unix socket')
    .option('-p, --port <port>', `listen on this TCP port (default: a socket systemd passed, else ${NBD_DEFAULT_PORT})`, intArg(0, 65535))
    .option('-b, --bind <addr>', 'TCP address to bind', '127.0.0.1')
    .addOption(new Option('-f, --format <format>', 'image format').choices([...FORMATS]).default('auto'))
    .option('-r, --read-only', 'refuse writes')
    .option('-x, --export-name <name>', 'export name', '')
    .option('-D, --description <text>', 'export description')
    .option('-e, --shared <n>', 'most simultaneous clients', intArg(1, 4096), 16)
    .option('--handshake-timeout <seconds>', 'drop clients that do not finish negotiation in time (0: never)', intArg(0, 3600), 10)
    .option('--idle-timeout <seconds>', 'close clients that send no request for this long, so idle ones cannot hold every --shared slot (0: never)', intArg(0, 86400), 0)
    .addOption(new Option('--tls <mode>', 'TLS for clients (NBD_OPT_STARTTLS): off, on (offered), require (nothing but STARTTLS before it)').choices(['off', 'on', 'require']).default('off'))
    .option('--tls-certificates <dir>', 'x509: a directory with ca-cert.pem, server-cert.pem, server-key.pem (as qemu and nbdkit lay it out)')
    .option('--tls-psk <file>', 'PSK: a file of username:hexkey lines (psktool)')
    .option('--tls-verify-peer', 'x509: require and check client certificates (signed by ca-cert.pem)')
    .option('--direct', 'open raw images with O_DIRECT (bypass the page cache)')
    .option('-c, --connections <n>', `an NBD URI image: connections to the server when it allows multi-conn (at most ${MAX_NBD_CONNECTIONS})`, intArg(1, MAX_NBD_CONNECTIONS), 1)
    .option('-n, --name <name>', 'device name: starts the sidecar in /run/nbdd/NAME (nbd.sock, control.sock)')
    .option('--sidecar <dir>', 'start the sidecar in this directory (mode 0700)')
    .option('-B, --bitmap <name>', 'publish dirty bitmap NAME on the export as qemu:dirty-bitmap:NAME (repeatable)', (v: string, all: string[]) => [...all, v], [] as string[])
    .option('--max-bitmaps <n>', MAX_BITMAPS_HELP, intArg(1, 65535), DEFAULT_BITMAP_LIMITS.maxBitmaps)
    .option('--bitmap-store <path>', 'keep persistent dirty bitmaps in this file (default IMAGE.nbdd-bitmaps)')
    .option('--metrics <addr:port>', METRICS_HELP, metricsArg)
    .option('--run <command>', 'run COMMAND with $uri set, then stop the server and exit with its status');
  addRemoteOptions(cmd).action((image: string, opts: ServeOptions) => serve(image, opts));
}

