/**
 * A `$NOTIFY_SOCKET` for tests: a bound AF_UNIX datagram socket (Node has no unix datagrams, so
 * through koffi) whose messages are collected by polling, each with the time it was seen.
 */
import koffi from 'koffi';
import { AF_UNIX, SOCK_CLOEXEC, SOCK_DGRAM, unixAddress } from '../../src/sys/libc.js';

const lib = koffi.load('libc.so.6');
const socket = lib.func('int socket(int domain, int type, int protocol)');
const bind = lib.func('int bind(int fd, const void *addr, uint32_t addrlen)');
const recv = lib.func('int64_t recv(int fd, _Out_ void *buf, size_t len, int flags)');
const close = lib.func('int close(int fd)');
const MSG_DONTWAIT = 0x40;

export interface Notification {
  fields: Record<string, string>;
  at: number;
}

export class NotifySocket {
  readonly messages: Notification[] = [];
  private readonly timer: NodeJS.Timeout;
  private listeners: (() => void)[] = [];

  private constructor(
    private readonly fd: number,
    readonly path: string,
  ) {
    this.timer = setInterval(() => this.poll(), 5);
  }

  static bind(path: string): NotifySocket {
    const fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
    if (fd < 0) throw new Error('socket failed');
    const addr = unixAddress(path);
    if (bind(fd, addr, addr.length) !== 0) throw new Error(`bind(${path}) failed`);
    return new NotifySocket(fd, path);
  }

  /** Reads every datagram waiting now. */
  poll(): void {
    const buf = Buffer.alloc(4096);
    for (;;) {
      const n = recv(this.fd, buf, buf.length, MSG_DONTWAIT) as number;
      if (n < 0) break;
      const fields: Record<string, string> = {};
      for (const line of buf.subarray(0, n).toString('utf8').split('\n')) {
        const eq = line.indexOf('=');
        if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
      }
      this.messages.push({ fields, at: Date.now() });
      for (const l of this.listeners) l();
    }
  }

  /** The first message with `key` (waiting up to `ms` for it). */
  async waitFor(key: string, ms = 15_000): Promise<Notification> {
    const deadline = Date.now() + ms;
    for (;;) {
      this.poll();
      const m = this.messages.find((x) => key in x.fields);
      if (m) return m;
      if (Date.now() > deadline) throw new Error(`no ${key}= notification within ${ms} ms (got ${JSON.stringify(this.messages)})`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 20);
        this.listeners.push(() => (clearTimeout(t), r()));
      });
      this.listeners = [];
    }
  }

  close(): void {
    clearInterval(this.timer);
    close(this.fd);
  }
}
