/**
 * The control socket: newline-delimited JSON-RPC 2.0 over a unix socket (see docs/control-api.md).
 *
 * - Access: the socket file is mode 0600 inside a 0700 directory, and every connection's peer uid
 *   (SO_PEERCRED) must be root or in `allowedUids` (default: the daemon's effective uid); others
 *   are closed at once.
 * - Requests of one connection are answered in order (a request's response is written before the
 *   next line is handled), so a client may pipeline.
 * - Bad input gets a JSON-RPC error and the connection stays open; only a write error, the peer
 *   closing, or a minute without a request (unless it subscribed to events) ends it. Too many
 *   connections: new ones are closed.
 * - Output is bounded: while a peer has MAX_PENDING_OUTPUT unread, nothing more is answered and
 *   reading pauses, however many requests it pipelined.
 * - Notifications (events) are queued per connection; a connection that does not read gets
 *   `events.lost` instead of unbounded buffering.
 */
import net from 'node:net';
import { promises as fsp } from 'node:fs';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { getEuid, peerCredentials, type PeerCredentials } from '../sys/libc.js';
import { LineSplitter, MAX_LINE_BYTES, handleLine, notification, tooLongResponse, type MethodTable } from './jsonrpc.js';

const log = logger('control');

/** Bytes a connection may have waiting to be written before events are dropped. */
export const MAX_PENDING_OUTPUT = 4 * 1024 * 1024;
/** Request lines a connection may have waiting before reading pauses. */
export const MAX_QUEUED_LINES = 64;

export interface ControlServerOptions {
  /** Peer uids allowed besides root (default: the daemon's effective uid). */
  allowedUids?: number[];
  maxConnections?: number;
  maxLine?: number;
  /** Close a connection that sends nothing for this long (ms) unless it subscribed to events. Default 60 s. */
  idleTimeoutMs?: number;
}

function drainedOrClosed(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

/** One client connection, as method handlers see it. */
export class ControlConnection {
  readonly peer: PeerCredentials;
  private lost = 0;
  private readonly cleanups = new Set<() => void>();

  constructor(
    private readonly socket: net.Socket,
    peer: PeerCredentials,
  ) {
    this.peer = peer;
  }

  get open(): boolean {
    return !this.socket.destroyed && this.socket.writable;
  }

  /** Sends a notification; drops it (counting) if the peer is not reading. */
  notify(method: string, params: unknown): void {
    if (!this.open) return;
    if (this.socket.writableLength > MAX_PENDING_OUTPUT) {
      this.lost++;
      return;
    }
    if (this.lost > 0) {
      this.socket.write(`${notification('events.lost', { count: this.lost })}\n`);
      this.lost = 0;
    }
    this.socket.write(`${notification(method, params)}\n`);
  }

  /** Whether something (an event subscription) waits on this connection for the daemon to speak. */
  get subscribed(): boolean {
    return this.cleanups.size > 0;
  }

  /** Runs `fn` when the connection closes (e.g. to unsubscribe). Returns a remover. */
  onClose(fn: () => void): () => void {
    this.cleanups.add(fn);
    return () => this.cleanups.delete(fn);
  }

  /** @internal */
  closed(): void {
    for (const fn of this.cleanups) fn();
    this.cleanups.clear();
  }
}

export class ControlServer {
  private readonly server: net.Server;
  private readonly connections = new Set<net.Socket>();
  private readonly allowed: Set<number>;
  private readonly maxConnections: number;
  private readonly maxLine: number;
  private readonly idleTimeoutMs: number;
  private path: string | null = null;

  constructor(
    private readonly methods: MethodTable<ControlConnection>,
    options: ControlServerOptions = {},
  ) {
    this.allowed = new Set([0, ...(options.allowedUids ?? [getEuid()])]);
    this.maxConnections = options.maxConnections ?? 32;
    this.maxLine = options.maxLine ?? MAX_LINE_BYTES;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 60_000;
    this.server = net.createServer((socket) => this.accept(socket));
  }

  /** Listens on `path` (replacing a stale socket file) and makes it mode 0600. */
  async listen(path: string): Promise<void> {
    await fsp.rm(path, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', (err) => reject(new NbddError(Errno.EADDRINUSE, `cannot listen on ${path}: ${err.message}`)));
      this.server.listen(path, () => resolve());
    });
    this.server.on('error', (err) => log.error(`${path}: ${err.message}`));
    await fsp.chmod(path, 0o600);
    this.path = path;
  }

  private accept(socket: net.Socket): void {
    let peer: PeerCredentials;
    try {
      peer = peerCredentials((socket as unknown as { _handle: { fd: number } })._handle.fd);
    } catch (err) {
      log.warn(`refusing a control connection: ${messageOf(err)}`);
      socket.destroy();
      return;
    }
    if (!this.allowed.has(peer.uid)) {
      log.warn(`refusing a control connection from uid ${peer.uid} (pid ${peer.pid})`);
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.maxConnections) {
      log.warn(`refusing a control connection: ${this.connections.size} open already`);
      socket.destroy();
      return;
    }
    this.connections.add(socket);
    const conn = new ControlConnection(socket, peer);
    const splitter = new LineSplitter(this.maxLine);
    // Lines are handled one at a time, in order. Reading pauses while too many wait, or while
    // too much output waits for the peer.
    let chain: Promise<void> = Promise.resolve();
    let waiting = 0;
    const maybeResume = (): void => {
      if (socket.isPaused() && waiting < MAX_QUEUED_LINES && socket.writableLength <= MAX_PENDING_OUTPUT) socket.resume();
    };
    socket.on('drain', maybeResume);
    socket.on('data', (chunk: Buffer) => {
      for (const ev of splitter.push(chunk)) {
        waiting++;
        chain = chain.then(async () => {
          // Nothing more is answered while the peer has not taken what it was sent: its
          // output stays within MAX_PENDING_OUTPUT plus one response, however many it pipelines.
          if (socket.writableLength > MAX_PENDING_OUTPUT) await drainedOrClosed(socket);
          if (!conn.open) return;
          const reply = 'tooLong' in ev ? tooLongResponse(ev.tooLong, this.maxLine) : await handleLine(ev.line, this.methods, conn);
          if (reply !== null && conn.open) socket.write(`${reply}\n`);
          waiting--;
          maybeResume();
        });
      }
      if (waiting >= MAX_QUEUED_LINES || socket.writableLength > MAX_PENDING_OUTPUT) socket.pause();
    });
    // An idle connection holds one of `maxConnections` slots: close it, unless it listens for events.
    socket.setTimeout(this.idleTimeoutMs, () => {
      if (waiting > 0 || conn.subscribed) return;
      log.info(`closing a control connection idle for ${this.idleTimeoutMs / 1000} s (pid ${peer.pid})`);
      socket.destroy();
    });
    socket.on('error', (err) => log.debug(`control connection: ${err.message}`));
    socket.on('close', () => {
      this.connections.delete(socket);
      conn.closed();
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Stops listening, closes every connection, removes the socket file. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.connections) s.destroy();
    await closed;
    if (this.path) await fsp.rm(this.path, { force: true });
  }
}
