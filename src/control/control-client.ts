/**
 * A client for the control socket (used by the CLI and the tests): `call` sends one request and
 * resolves with its result (or rejects with an RpcError carrying the server's code and data);
 * notifications go to `onNotification`.
 */
import net from 'node:net';
import { Errno, NbddError } from '../core/errors.js';
import { JSONRPC_VERSION, LineSplitter, RpcError, type RpcErrorObject } from './jsonrpc.js';

/** Longest response line the client accepts (status with many bitmaps stays far below). */
const MAX_RESPONSE_LINE = 64 * 1024 * 1024;

export class ControlClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>();
  private readonly splitter = new LineSplitter(MAX_RESPONSE_LINE);
  onNotification: (method: string, params: unknown) => void = () => undefined;
  readonly closed: Promise<void>;

  private constructor(private readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const ev of this.splitter.push(chunk)) if ('line' in ev) this.receive(ev.line);
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        const err = new NbddError(Errno.ECONNRESET, 'the control connection closed');
        for (const w of this.waiting.values()) w.reject(err);
        this.waiting.clear();
        resolve();
      }),
    );
  }

  /** Connects to the control socket at `path`. Throws ENOENT/ECONNREFUSED as NbddError. */
  static connect(path: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path);
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(new ControlClient(s));
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        const errno = err.code === 'ENOENT' ? Errno.ENOENT : err.code === 'EACCES' ? Errno.EACCES : Errno.ECONNRESET;
        reject(new NbddError(errno, `cannot connect to ${path}: ${err.message}`));
      });
    });
  }

  call<T = unknown>(method: string, params?: Record<string, unknown>): Promise<T> {
    const id = this.nextId++;
    const req = params === undefined ? { jsonrpc: JSONRPC_VERSION, id, method } : { jsonrpc: JSONRPC_VERSION, id, method, params };
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(req)}\n`);
    });
  }

  private receive(line: string): void {
    let msg: { id?: unknown; method?: unknown; params?: unknown; result?: unknown; error?: RpcErrorObject };
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof msg.method === 'string' && !('id' in msg)) {
      this.onNotification(msg.method, msg.params);
      return;
    }
    const w = typeof msg.id === 'number' ? this.waiting.get(msg.id) : undefined;
    if (!w) return;
    this.waiting.delete(msg.id as number);
    if (msg.error) w.reject(new RpcError(msg.error.code, msg.error.message, msg.error.data));
    else w.resolve(msg.result);
  }

  close(): Promise<void> {
    this.socket.end();
    return this.closed;
  }
}

/** One call on an open control connection; a JSON-RPC error becomes an NbddError with its errno. */
export async function callOn<T = unknown>(client: ControlClient, method: string, params?: Record<string, unknown>): Promise<T> {
  try {
    return await client.call<T>(method, params);
  } catch (err) {
    if (err instanceof RpcError) {
      const errnoName = (err.data as { errno?: string } | undefined)?.errno;
      const errno = errnoName && errnoName in Errno ? Errno[errnoName as keyof typeof Errno] : Errno.EINVAL;
      throw new NbddError(errno, err.message);
    }
    throw err;
  }
}
