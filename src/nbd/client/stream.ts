/**
 * The client's socket: connects (Unix socket or TCP with TCP_NODELAY), buffers what arrives in a
 * `ChunkReader`, and offers two ways to consume it: `read(n)` (awaitable, for the sequential
 * handshake) and `onBytes` (a synchronous hook, for the transmission parser). Writes made in one
 * event-loop turn leave in one corked batch.
 *
 * Receiving (plain sockets): reads skip Node's stream and land in a `ReadSlab`, or, while a large
 * READ's data is due and nothing is buffered, straight in the caller's destination (`sink`), so
 * the payload is copied once, by the kernel, and no receive buffer is allocated per read. After
 * STARTTLS the TLS socket's 'data' chunks are used instead.
 *
 * The only client module that touches a socket.
 */
import net from 'node:net';
import type * as tls from 'node:tls';
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import type { NbdTransport } from '../uri.js';
import { TurnWriter } from '../turn-writer.js';
import { ChunkReader } from '../wire/reader.js';
import { ReadSlab } from '../read-slab.js';
import { nodeTls } from '../tls.js';

const EMPTY = Buffer.alloc(0);
/** Data due for at least this many bytes is read straight into its destination (`DirectSink`). */
const DIRECT_READ_MIN = 32 * 1024;

/** Where payload bytes may land straight from the socket (the reply parser, in transmission). */
export interface DirectSink {
  /** The buffer the next read should fill when at least `min` bytes are due for it, else null. */
  target(min: number): Buffer | null;
  /** `n` bytes landed at the start of the last target. */
  filled(n: number): void;
}

export function describeTransport(t: NbdTransport): string {
  return t.kind === 'unix' ? `unix:${t.path}` : `${t.host.includes(':') ? `[${t.host}]` : t.host}:${t.port}`;
}

export class ByteStream {
  readonly reader = new ChunkReader();
  /** Called after every arrival of bytes once set (transmission); `read()` is unusable then. */
  onBytes: (() => void) | null = null;
  /** Called once when the connection is gone, with the reason. */
  onClose: ((err: NbddError) => void) | null = null;
  /** Set for transmission: takes large payloads without a copy (then `onBytes` is called too). */
  sink: DirectSink | null = null;
  /** The sink's buffer handed to the socket for the next read, when it is one. */
  private directTarget: Buffer | null = null;
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: NbddError | null = null;
  private readonly out: TurnWriter;
  readonly closed: Promise<void>;

  private constructor(
    private socket: net.Socket,
    readonly peer: string,
    private readonly slab: ReadSlab,
  ) {
    this.out = new TurnWriter(socket);
    this.listen(socket);
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.fail(new NbddError(Errno.ECONNRESET, `connection to NBD server ${peer} closed`));
        resolve();
      }),
    );
  }

  private readonly onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    if (this.onBytes) this.onBytes();
    else this.satisfy();
  };

  /** The buffer the plain socket's next read fills (`onread`). */
  private nextReadBuffer(): Buffer {
    const direct = this.reader.length === 0 && !this.failure && this.sink ? this.sink.target(DIRECT_READ_MIN) : null;
    this.directTarget = direct;
    return direct ?? this.slab.region();
  }

  /** `n` bytes arrived in `buf`, the last buffer `nextReadBuffer` returned. */
  private landed(n: number, buf: Uint8Array): void {
    if (buf === this.directTarget) {
      this.directTarget = null;
      this.sink!.filled(n);
      this.onBytes?.();
    } else this.slab.deliver(n, this.reader, this.onData);
  }

  private listen(socket: net.Socket): void {
    socket.on('data', this.onData);
    socket.on('error', (err) => this.fail(new NbddError(Errno.ECONNRESET, `connection to NBD server ${this.peer} failed: ${err.message}`)));
    socket.on('end', () => this.fail(new NbddError(Errno.ECONNRESET, `NBD server ${this.peer} closed the connection`)));
  }

  /**
   * After the server accepted NBD_OPT_STARTTLS: the client side of TLS on this connection; resolves
   * once the handshake is done (rejects with EACCES saying why it failed).
   */
  startTls(options: tls.ConnectionOptions): Promise<void> {
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.removeAllListeners('error');
    plain.removeAllListeners('end');
    plain.on('error', () => undefined); // the TLS socket reports the failure
    this.out.flushNow();
    const secure = nodeTls().connect({ ...options, socket: plain });
    this.socket = secure;
    this.out.retarget(secure);
    return new Promise((resolve, reject) => {
      const failed = (err: Error): void => {
        const reason = new NbddError(Errno.EACCES, `TLS with NBD server ${this.peer} failed: ${err.message}`);
        reject(reason);
        this.destroy(reason);
      };
      secure.once('error', failed);
      secure.once('secureConnect', () => {
        secure.off('error', failed);
        this.listen(secure);
        resolve();
      });
    });
  }

  /** Opens the connection; rejects with NbddError (ECONNREFUSED etc. as their errno, or ETIMEDOUT). */
  static connect(t: NbdTransport, timeoutMs: number): Promise<ByteStream> {
    const peer = describeTransport(t);
    return new Promise((resolve, reject) => {
      const slab = new ReadSlab();
      let stream: ByteStream | null = null;
      // The first buffer is asked for when the socket connects, before the stream exists.
      const onread = {
        buffer: () => (stream ? stream.nextReadBuffer() : slab.region()),
        callback: (n: number, buf: Uint8Array) => {
          stream!.landed(n, buf);
          return true;
        },
      };
      const where = t.kind === 'unix' ? { path: t.path } : { host: t.host, port: t.port, noDelay: true };
      const socket = net.connect({ ...where, onread });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new NbddError(Errno.ETIMEDOUT, `connecting to NBD server ${peer} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      const onError = (err: NodeJS.ErrnoException): void => {
        clearTimeout(timer);
        const errno = Math.abs(err.errno ?? Errno.EIO);
        reject(new NbddError(errno, `cannot connect to NBD server ${peer}: ${messageOf(err)}`));
      };
      socket.once('error', onError);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        if (t.kind === 'tcp') socket.setNoDelay(true);
        stream = new ByteStream(socket, peer, slab);
        resolve(stream);
      });
    });
  }

  /**
   * Exactly `n` bytes (a view or a copy; the caller owns it). Only one read at a time, and only
   * before `onBytes` is set. Rejects with the connection's failure.
   */
  read(n: number): Promise<Buffer> {
    if (n === 0) return Promise.resolve(EMPTY);
    if (this.reader.length >= n) return Promise.resolve(this.reader.consume(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
    });
  }

  private satisfy(): void {
    const w = this.want;
    if (!w || this.reader.length < w.n) return;
    this.want = null;
    w.resolve(this.reader.consume(w.n));
  }

  /** Queues bytes; the buffer must not change until written. Ignored once the connection failed. */
  write(buf: Buffer): void {
    if (!this.failure) this.out.write(buf);
  }

  /** The reason the connection failed, or null while it is usable. */
  get error(): NbddError | null {
    return this.failure;
  }

  /** Sends what is queued, then half-closes; resolves when the socket closed (or after `graceMs`). */
  async end(graceMs = 5000): Promise<void> {
    this.out.flushNow();
    this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), graceMs);
    await this.closed;
    clearTimeout(timer);
  }

  /** Drops the connection now; the reason goes to `onClose` and pending reads. */
  destroy(reason: NbddError): void {
    this.fail(reason);
    this.socket.destroy();
  }

  private fail(err: NbddError): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.want;
    this.want = null;
    w?.reject(err);
    this.onClose?.(err);
  }
}
