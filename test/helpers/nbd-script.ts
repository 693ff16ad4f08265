/**
 * A byte-level NBD client for server tests: send exactly the frames a test builds (well-formed or
 * not) and read the server's answer as it arrives.
 */
import net from 'node:net';
import { NBD_INFO, NBD_OPT, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES } from '../../src/nbd/wire/constants.js';
import {
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from '../../src/nbd/wire/handshake.js';
import { decodeChunkPayload, decodeReplyHeader, encodeRequest, type DecodedChunk } from '../../src/nbd/wire/transmission.js';

export class ScriptClient {
  private readonly socket: net.Socket;
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  ended = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.ended = true;
        this.wake();
        resolve();
      }),
    );
    socket.on('error', () => undefined);
  }

  /** A client over an already connected socket (e.g. one end of a socketpair). */
  static over(socket: net.Socket): ScriptClient {
    return new ScriptClient(socket);
  }

  static connect(path: string): Promise<ScriptClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path);
      s.once('connect', () => resolve(new ScriptClient(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  send(b: Buffer): void {
    this.socket.write(b);
  }

  /** Stops reading from the socket (a client that never takes its replies). */
  stopReading(): void {
    this.socket.pause();
  }

  /** Sends `b` in pieces, one write per piece, with a pause between so they arrive apart. */
  async sendSplit(b: Buffer, cuts: number[]): Promise<void> {
    let at = 0;
    for (const cut of [...cuts, b.length]) {
      if (cut > at) this.socket.write(b.subarray(at, cut));
      at = cut;
      await new Promise((r) => setImmediate(r));
    }
  }

  /** The next `n` bytes; rejects if the server closes first or nothing comes within `ms`. */
  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true if the server closes the connection within `ms` (after any pending bytes). */
  async closesWithin(ms: number): Promise<boolean> {
    return Promise.race([this.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
  }

  get pending(): number {
    return this.buf.length;
  }

  destroy(): void {
    this.socket.destroy();
  }

  /* ---------------------------------------------------------------- protocol helpers */

  async readGreeting(): Promise<number> {
    return (await this.read(18)).readUInt16BE(16);
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = decodeOptionReplyHeader(await this.read(20));
    return { option: h.option, type: h.type, data: Buffer.from(await this.read(h.length)) };
  }

  /** Reads option replies up to and including the final one (ACK or an error). */
  async readOptionReplies(): Promise<{ option: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type === 1 || r.type >= 0x80000000) return out;
    }
  }

  /** Reads a simple reply, with `dataLength` bytes of data when it reports success. */
  async readSimpleReply(dataLength = 0): Promise<{ error: number; cookie: number; data: Buffer }> {
    const h = decodeReplyHeader(await this.read(16));
    if (h.kind !== 'simple') throw new Error('expected a simple reply');
    const data = h.error === 0 && dataLength > 0 ? Buffer.from(await this.read(dataLength)) : Buffer.alloc(0);
    return { error: h.error, cookie: h.cookieLo, data };
  }

  /** Reads one reply of either kind (a structured reply: one chunk). */
  async readReply(readLengths: Map<number, number> = new Map()): Promise<Reply> {
    const magic = (await this.peek(4)).readUInt32BE(0);
    if (magic === 0x67446698) {
      const h = decodeReplyHeader(await this.read(16));
      if (h.kind !== 'simple') throw new Error('unreachable');
      const len = h.error === 0 ? readLengths.get(h.cookieLo) ?? 0 : 0;
      return { kind: 'simple', cookie: h.cookieLo, error: h.error, data: Buffer.from(await this.read(len)) };
    }
    const h = decodeReplyHeader(await this.read(20));
    if (h.kind !== 'chunk') throw new Error('unreachable');
    const payload = Buffer.from(await this.read(h.length));
    return { kind: 'chunk', cookie: h.cookieLo, done: (h.flags & 1) !== 0, chunk: decodeChunkPayload(h.type, payload) };
  }

  private async peek(n: number): Promise<Buffer> {
    const b = await this.read(n);
    this.buf = Buffer.concat([b, this.buf]);
    return b;
  }
}

export type Reply =
  | { kind: 'simple'; cookie: number; error: number; data: Buffer }
  | { kind: 'chunk'; cookie: number; done: boolean; chunk: DecodedChunk };

/* ---------------------------------------------------------------- frame builders */

export const clientFlags = (flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Buffer => encodeClientFlags(flags);
export const optStructured = (): Buffer => encodeOption(NBD_OPT.STRUCTURED_REPLY);
export const optGo = (name = '', infos: number[] = [NBD_INFO.BLOCK_SIZE]): Buffer => encodeOption(NBD_OPT.GO, encodeInfoRequest({ exportName: name, infos }));
export const optSetMeta = (queries: string[], name = ''): Buffer => encodeOption(NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: name, queries }));
export const optListMeta = (queries: string[], name = ''): Buffer => encodeOption(NBD_OPT.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName: name, queries }));

export function request(type: number, cookie: number, offset: number, length: number, flags = 0, data?: Buffer): Buffer {
  const h = encodeRequest({ flags, type, cookieHi: 0, cookieLo: cookie, offset, length });
  return data ? Buffer.concat([h, data]) : h;
}
