/**
 * The NBD server: exports by name, listeners (unix socket, TCP), a connection cap, and graceful
 * shutdown. Sessions do the protocol; this file only accepts and tracks them.
 */
import type { ServerTls } from '../tls.js';
import net from 'node:net';
import { promises as fsp } from 'node:fs';
import { Errno, NbddError } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import { unixSocketPath } from '../../sys/libc.js';
import { NbdExport } from './export.js';
import { ReplyBudget } from './reply-budget.js';
import { NbdSession, type SessionHost } from './session.js';
import { slabSocket, slabSocketFrom } from '../read-slab.js';

const log = logger('server');

export interface ServerOptions {
  /** Most simultaneous client connections (kernel sockets are not counted). Default 16. */
  maxConnections?: number;
  /** Negotiation time limit in ms; 0 disables. Default 10 000. */
  handshakeTimeoutMs?: number;
  /**
   * Close a client connection that has sent no request and had none in flight for this long, in
   * ms; 0 (the default) never does. Kernel sockets (`serveTransmission`) are never idle-closed.
   */
  idleTimeoutMs?: number;
  /** READ data (in flight or unsent) all client connections together may hold. Default 96 MiB. */
  replyBudgetBytes?: number;
  /** TLS for client connections (NBD_OPT_STARTTLS; src/nbd/tls.ts); none: plaintext only. */
  tls?: ServerTls | null;
}

/** A client session as the idle sweep last saw it. */
interface IdleMark {
  activity: number;
  since: number;
}

export class NbdServer implements SessionHost {
  private readonly exports = new Map<string, NbdExport>();
  private readonly sessions = new Set<NbdSession>();
  private readonly listeners: net.Server[] = [];
  private readonly unixPaths: string[] = [];
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number;
  private clientCount = 0;
  private closing: Promise<void> | null = null;
  private readonly idleTimeoutMs: number;
  /** READ data all clients together may hold (reply-budget.ts). */
  private readonly replyBudget: ReplyBudget;
  private readonly clients = new Map<NbdSession, IdleMark>();
  /** Sessions over client sockets (not the kernel's). */
  private readonly clientSessions = new Set<NbdSession>();
  private idleSweep: NodeJS.Timeout | null = null;
  private readonly tls: ServerTls | null;

  constructor(options: ServerOptions = {}) {
    this.tls = options.tls ?? null;
    this.maxConnections = options.maxConnections ?? 16;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 0;
    this.replyBudget = new ReplyBudget(options.replyBudgetBytes, () => this.clientOutputBytes());
  }

  /**
   * Closes client sessions idle for `idleTimeoutMs`. A sweep, not a timer per request: sessions
   * only count their activity, and the sweep notices when a count stops moving.
   */
  private sweepIdle(): void {
    const now = Date.now();
    for (const [session, mark] of this.clients) {
      if (!session.idle || session.activity !== mark.activity) {
        mark.activity = session.activity;
        mark.since = now;
      } else if (now - mark.since >= this.idleTimeoutMs) {
        this.clients.delete(session);
        session.closeIdle();
      }
    }
  }

  /* ------------------------------------------------------------ exports */

  addExport(exp: NbdExport): void {
    if (this.exports.has(exp.name)) throw new NbddError(Errno.EEXIST, `an export named '${exp.name}' already exists`);
    this.exports.set(exp.name, exp);
  }

  removeExport(name: string): NbdExport | undefined {
    const exp = this.exports.get(name);
    this.exports.delete(name);
    return exp;
  }

  /** The export of that name; the empty name means the first export added (the default). */
  findExport(name: string): NbdExport | undefined {
    return this.exports.get(name) ?? (name === '' ? this.exports.values().next().value : undefined);
  }

  listExports(): NbdExport[] {
    return [...this.exports.values()];
  }

  /* ------------------------------------------------------------ listening */

  /** Listens on a unix socket. A stale socket file (nobody answering) is replaced. */
  async listenUnix(path: string): Promise<void> {
    await removeStaleSocket(path);
    await this.listen(path, (srv) => srv.listen(path));
    this.unixPaths.push(path);
  }

  /** Listens on TCP; returns the bound port (useful with port 0). */
  async listenTcp(port: number, host = '127.0.0.1'): Promise<number> {
    const srv = await this.listen(`${host}:${port}`, (s) => s.listen(port, host));
    return (srv.address() as net.AddressInfo).port;
  }

  /** Listens on an inherited listening socket (systemd socket activation); returns its address. */
  async listenFd(fd: number): Promise<string | net.AddressInfo> {
    const srv = await this.listen(`fd ${fd}`, (s) => s.listen({ fd }));
    // Node knows a TCP socket's address; a unix one taken over by fd it leaves unnamed.
    return srv.address() || (unixSocketPath(fd) ?? `fd ${fd}`);
  }

  private listen(what: string, start: (srv: net.Server) => void): Promise<net.Server> {
    const srv = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    return new Promise((resolve, reject) => {
      srv.once('error', (err: NodeJS.ErrnoException) => {
        reject(new NbddError(Errno.EADDRINUSE, `cannot listen on ${what}: ${err.message}`));
      });
      srv.once('listening', () => {
        srv.removeAllListeners('error');
        srv.on('error', (err) => log.error(`listener ${what}: ${err.message}`));
        this.listeners.push(srv);
        const a = srv.address();
        // A TCP listener on port 0 says the port the kernel gave it.
        log.info(`listening on ${what.endsWith(':0') && a && typeof a === 'object' ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : what}`);
        resolve(srv);
      });
      start(srv);
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.clientCount >= this.maxConnections) {
      log.warn(`refusing a connection: ${this.clientCount} clients already (--shared ${this.maxConnections})`);
      socket.destroy();
      return;
    }
    this.clientCount++;
    const options = { handshakeTimeoutMs: this.handshakeTimeoutMs, replyBudget: this.replyBudget, tls: this.tls };
    // Plain connections read into a slab; where STARTTLS may come, Node's TLS needs the stream
    // (accepted paused, it flows once the session listens).
    let session = this.tls ? null : NbdSession.overSlab((reads) => slabSocketFrom(socket, reads), this, options);
    if (!session) {
      session = new NbdSession(socket, this, options);
      socket.resume();
    }
    session.closed.then(() => this.clientCount--);
    this.sessions.add(session);
    this.clientSessions.add(session);
    if (this.idleTimeoutMs > 0) {
      this.clients.set(session, { activity: session.activity, since: Date.now() });
      this.idleSweep ??= setInterval(() => this.sweepIdle(), Math.min(1000, Math.max(10, this.idleTimeoutMs / 4))).unref();
    }
    session.startHandshake();
  }

  /**
   * Serves a connected socket fd that is already in the transmission phase (the daemon's end of a
   * socketpair whose other end was given to the kernel). Simple replies only.
   */
  serveTransmission(fd: number, exportName: string): NbdSession {
    const exp = this.exports.get(exportName);
    if (!exp) throw new NbddError(Errno.ENOENT, `no export named '${exportName}'`);
    const session = NbdSession.overSlab((reads) => slabSocket(fd, reads), this, { handshakeTimeoutMs: 0, splicePayloads: true })!;
    this.sessions.add(session);
    session.startTransmission(exp);
    return session;
  }

  /** Reply bytes waiting in client sockets (asked only when a large READ wants the budget). */
  private clientOutputBytes(): number {
    let n = 0;
    for (const s of this.clientSessions) n += s.unsentBytes;
    return n;
  }

  sessionClosed(session: NbdSession): void {
    this.sessions.delete(session);
    this.clientSessions.delete(session);
    this.clients.delete(session);
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  /* ------------------------------------------------------------ shutdown */

  /**
   * Stops listening, lets every session answer what it has in flight, then flushes and closes
   * the queue of every export that owns its queue. Idempotent.
   */
  close(): Promise<void> {
    if (this.idleSweep) clearInterval(this.idleSweep);
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    // A listener's close callback waits for its connections, so stop accepting first, drain the
    // sessions, and only then wait for the listeners.
    const listenersClosed = Promise.all(this.listeners.map((l) => new Promise<void>((r) => l.close(() => r()))));
    await Promise.all(this.unixPaths.map((p) => fsp.rm(p, { force: true })));
    await Promise.all([...this.sessions].map((s) => s.shutdown()));
    await listenersClosed;
    for (const exp of this.exports.values()) {
      if (!exp.ownsQueue) continue;
      try {
        await exp.queue.close();
      } catch (err) {
        log.error(`closing export '${exp.name}': ${(err as Error).message}`);
      }
    }
  }
}

/** Removes `path` if it is a unix socket nobody listens on; refuses if someone does. */
async function removeStaleSocket(path: string): Promise<void> {
  const st = await fsp.lstat(path).catch(() => null);
  if (!st) return;
  if (!st.isSocket()) throw new NbddError(Errno.EEXIST, `${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new NbddError(Errno.EBUSY, `${path} is in use by another server`);
  await fsp.rm(path, { force: true });
}
