/**
 * A generic-netlink socket through koffi: socket, bind, setsockopt, send, recv, close. Requests
 * are synchronous (the control path is slow-path code: the kernel answers CONNECT, STATUS and the
 * like within the system call), multicast notifications are read without blocking by `poll()`.
 *
 * Errors are `NbddError`s with the kernel's errno and, where the kernel gave one, its extended-ack
 * text. Turning errnos into advice for people is the caller's job (src/kernel/nbd-control.ts).
 */
import koffi from 'koffi';
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';
import { decodeGenl, decodeMessages, decodeNlError, encodeGenlMessage, type GenlMessage } from '../netlink/codec.js';
import { AF_NETLINK, NETLINK_GENERIC, NETLINK_SOCKOPT, NLM_F, NLMSG, NL_MAX_MESSAGE, SOL_NETLINK } from '../netlink/constants.js';
import { decodeFamilyReply, getFamilyCommand, type FamilyInfo, type GenlCommand } from '../netlink/nlctrl.js';
import { SOCK_CLOEXEC, lastErrno, sysError } from './libc.js';

const lib = koffi.load('libc.so.6');
const c = {
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  bind: lib.func('int bind(int fd, const void *addr, uint32_t len)'),
  setsockopt: lib.func('int setsockopt(int fd, int level, int name, const void *value, uint32_t len)'),
  send: lib.func('intptr_t send(int fd, const void *buf, size_t len, int flags)'),
  recv: lib.func('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
  close: lib.func('int close(int fd)'),
};

const SOCK_RAW = 3;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;
const MSG_DONTWAIT = 0x40;
const EAGAIN = Errno.EAGAIN;
const EINTR = 4;

/** How long a request waits for the kernel's answer before failing with ETIMEDOUT. */
const REPLY_TIMEOUT_S = 30;

/** A failed netlink request: errno from the kernel plus its extended-ack text, if any. */
export class NetlinkError extends NbddError {
  constructor(
    readonly operation: string,
    errno: number,
    readonly kernelMessage?: string,
  ) {
    super(errno, `${operation}: ${nameOfErrno(errno)}${kernelMessage ? ` (${kernelMessage})` : ''}`);
    this.name = 'NetlinkError';
  }
}

function int32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32LE(value);
  return b;
}

export class GenlSocket {
  private seq = Math.floor(Date.now() / 1000) >>> 0;
  private readonly rx = Buffer.alloc(NL_MAX_MESSAGE);
  private fd: number;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** Opens and binds a NETLINK_GENERIC socket (kernel-assigned port id) with extended acks on. */
  static open(): GenlSocket {
    const fd = c.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC) as number;
    if (fd < 0) throw sysError('socket', lastErrno(), 'AF_NETLINK, NETLINK_GENERIC');
    const sock = new GenlSocket(fd);
    try {
      // struct sockaddr_nl: u16 family, u16 pad, u32 pid (0 = kernel assigns), u32 groups.
      const addr = Buffer.alloc(12);
      addr.writeUInt16LE(AF_NETLINK, 0);
      if (c.bind(fd, addr, addr.length) !== 0) throw sysError('bind', lastErrno(), 'AF_NETLINK');
      sock.setOption(SOL_NETLINK, NETLINK_SOCKOPT.EXT_ACK, int32(1));
      sock.setOption(SOL_NETLINK, NETLINK_SOCKOPT.CAP_ACK, int32(1));
      // struct timeval { long tv_sec; long tv_usec; } on 64-bit Linux.
      const tv = Buffer.alloc(16);
      tv.writeBigInt64LE(BigInt(REPLY_TIMEOUT_S), 0);
      sock.setOption(SOL_SOCKET, SO_RCVTIMEO, tv);
    } catch (err) {
      sock.close();
      throw err;
    }
    return sock;
  }

  private setOption(level: number, name: number, value: Buffer): void {
    if (c.setsockopt(this.fd, level, name, value, value.length) !== 0) throw sysError('setsockopt', lastErrno(), `${level}, ${name}`);
  }

  private checkOpen(): void {
    if (this.fd < 0) throw new NbddError(Errno.EBADF, 'netlink socket is closed');
  }

  /**
   * Sends `command` with NLM_F_REQUEST | NLM_F_ACK and waits for its acknowledgement. Returns the
   * family messages the kernel sent for this request before the ACK (e.g. CONNECT's reply).
   * Throws `NetlinkError` with the kernel's errno when the request fails.
   */
  request(command: GenlCommand, operation: string): GenlMessage[] {
    this.checkOpen();
    const seq = (this.seq = (this.seq + 1) >>> 0);
    const msg = encodeGenlMessage({ ...command, flags: NLM_F.REQUEST | NLM_F.ACK, seq });
    const sent = Number(c.send(this.fd, msg, msg.length, 0));
    if (sent !== msg.length) throw new NetlinkError(operation, sent < 0 ? lastErrno() : Errno.EIO);
    const replies: GenlMessage[] = [];
    for (;;) {
      for (const m of decodeMessages(this.receive(0, operation))) {
        if (m.seq !== seq) continue; // a late answer to an earlier, abandoned request
        if (m.type === NLMSG.ERROR) {
          const ack = decodeNlError(m);
          if (ack.errno !== 0) throw new NetlinkError(operation, ack.errno, ack.message);
          return replies;
        }
        if (m.type === NLMSG.DONE || m.type === NLMSG.NOOP) continue;
        if (m.type === command.family) replies.push(decodeGenl(m.payload));
      }
    }
  }

  /** Returns one datagram, copied out of the receive buffer (decoded messages are views of it). */
  private receive(flags: number, operation: string): Buffer {
    for (;;) {
      const n = Number(c.recv(this.fd, this.rx, this.rx.length, flags));
      if (n >= 0) return Buffer.from(this.rx.subarray(0, n));
      const errno = lastErrno();
      if (errno === EINTR) continue;
      if (errno === EAGAIN && !(flags & MSG_DONTWAIT)) {
        throw new NetlinkError(operation, Errno.ETIMEDOUT, `no answer within ${REPLY_TIMEOUT_S} s`);
      }
      throw new NetlinkError(operation, errno);
    }
  }

  /**
   * Resolves a family by name through nlctrl. Throws NetlinkError with ENOENT when no such family
   * is registered (for "nbd": the module is not loaded).
   */
  resolveFamily(name: string): FamilyInfo {
    const replies = this.request(getFamilyCommand(name), `looking up the generic netlink family '${name}'`);
    if (replies.length === 0) throw new NbddError(Errno.EPROTO, `nlctrl sent no description of '${name}'`);
    return decodeFamilyReply(replies[0]!);
  }

  /** Subscribes to a multicast group (NETLINK_ADD_MEMBERSHIP). */
  joinGroup(groupId: number): void {
    this.checkOpen();
    this.setOption(SOL_NETLINK, NETLINK_SOCKOPT.ADD_MEMBERSHIP, int32(groupId));
  }

  /**
   * Reads every notification already queued, without blocking: the family messages of `family`
   * (other types are skipped). Returns [] when nothing is waiting.
   */
  poll(family: number): GenlMessage[] {
    this.checkOpen();
    const out: GenlMessage[] = [];
    for (;;) {
      const n = Number(c.recv(this.fd, this.rx, this.rx.length, MSG_DONTWAIT));
      if (n < 0) {
        const errno = lastErrno();
        if (errno === EAGAIN || errno === EINTR) return out;
        throw new NetlinkError('reading netlink notifications', errno);
      }
      for (const m of decodeMessages(Buffer.from(this.rx.subarray(0, n)))) if (m.type === family) out.push(decodeGenl(m.payload));
    }
  }

  /** Idempotent. */
  close(): void {
    if (this.fd >= 0) c.close(this.fd);
    this.fd = -1;
  }
}
