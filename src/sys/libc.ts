/**
 * The few system calls Node does not expose, through koffi (see docs/architecture.md, "Native
 * code thin"). Each wrapper throws an `NbddError` carrying the C errno on failure.
 *
 * Only slow-path or per-request-cheap calls live here; nothing in this file blocks for long
 * (lseek on SEEK_DATA/SEEK_HOLE, fallocate, flock with LOCK_NB, ioctl, socketpair, pipe2, splice
 * without waiting).
 */
import koffi from 'koffi';
import { Errno, NbddError, nameOfErrno } from '../core/errors.js';

const lib = koffi.load('libc.so.6');

// Registered by name for the preadv2 prototype below.
koffi.struct('nbdd_iovec', { iov_base: 'void *', iov_len: 'size_t' });
// struct flock (x86_64 and aarch64 glibc: 32 bytes, natural alignment).
koffi.struct('nbdd_flock', { l_type: 'int16_t', l_whence: 'int16_t', l_start: 'int64_t', l_len: 'int64_t', l_pid: 'int32_t' });

const c = {
  errnoLocation: lib.func('int *__errno_location()'),
  lseek: lib.func('int64_t lseek(int fd, int64_t offset, int whence)'),
  fallocate: lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)'),
  flock: lib.func('int flock(int fd, int operation)'),
  ioctlU64: lib.func('int ioctl(int fd, unsigned long request, _Out_ uint64_t *out)'),
  ioctlRange: lib.func('int ioctl(int fd, unsigned long request, const uint64_t *range)'),
  socketpair: lib.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  close: lib.func('int close(int fd)'),
  preadv2: lib.func('int64_t preadv2(int fd, const nbdd_iovec *iov, int iovcnt, int64_t offset, int flags)'),
  fcntlLock: lib.func('int fcntl(int fd, int cmd, _Inout_ nbdd_flock *lock)'),
  getuid: lib.func('uint32_t getuid()'),
  geteuid: lib.func('uint32_t geteuid()'),
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  sendto: lib.func('int64_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)'),
  getsockname: lib.func('int getsockname(int fd, _Out_ void *addr, _Inout_ uint32_t *addrlen)'),
  ioctlNone: lib.func('int ioctl(int fd, unsigned long request, unsigned long arg)'),
  getsockopt: lib.func('int getsockopt(int fd, int level, int optname, void *optval, _Inout_ uint32_t *optlen)'),
  getrusage: lib.func('int getrusage(int who, void *usage)'),
  madvise: lib.func('int madvise(uintptr_t addr, size_t length, int advice)'),
  pipe2: lib.func('int pipe2(_Out_ int *fds, int flags)'),
  setsockoptInt: lib.func('int setsockopt(int fd, int level, int name, _Inout_ int *value, uint32_t len)'),
  fcntlInt: lib.func('int fcntl(int fd, int cmd, int arg)'),
  splice: lib.func('int64_t splice(int fdIn, _Inout_ int64_t *offIn, int fdOut, _Inout_ int64_t *offOut, size_t len, unsigned int flags)'),
};

/** The calling thread's errno (read right after a failed call). */
export function lastErrno(): number {
  return koffi.decode(c.errnoLocation(), 'int') as number;
}

export function sysError(call: string, errno: number, detail = ''): NbddError {
  const what = detail ? `${call}(${detail})` : call;
  return new NbddError(errno, `${what} failed: ${nameOfErrno(errno)}`);
}

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/**
 * lseek with SEEK_DATA / SEEK_HOLE. Returns -1 where the kernel says ENXIO (no data at or after
 * `offset`), so callers can treat "past the last data" without an exception.
 */
export function seek(fd: number, offset: number, whence: typeof SEEK_DATA | typeof SEEK_HOLE): number {
  const r = Number(c.lseek(fd, offset, whence));
  if (r >= 0) return r;
  const errno = lastErrno();
  if (errno === 6 /* ENXIO */) return -1;
  throw sysError('lseek', errno, whence === SEEK_DATA ? 'SEEK_DATA' : 'SEEK_HOLE');
}

const RUSAGE_THREAD = 1;
/** struct rusage (x86_64 and aarch64: 2 timevals, 14 longs), and where ru_nvcsw lies in it. */
const RUSAGE_BYTES = 144;
const RU_NVCSW_OFFSET = 128;
const rusage = Buffer.alloc(RUSAGE_BYTES);

/**
 * How many times the calling thread has given up the CPU of its own accord (ru_nvcsw of
 * RUSAGE_THREAD): it slept — on I/O, a lock, a page fault, dirty-page throttling. Being preempted
 * (ru_nivcsw) does not count. About 0.4 µs. NaN if the kernel will not say (never equal to an
 * earlier reading: "it may have slept").
 */
export function voluntarySwitches(): number {
  if (c.getrusage(RUSAGE_THREAD, rusage) !== 0) return NaN;
  return Number(rusage.readBigInt64LE(RU_NVCSW_OFFSET));
}

const RWF_NOWAIT = 0x08;
const EAGAIN = 11;

/**
 * Reads into `buf` at `offset` only if that needs no waiting (preadv2 with RWF_NOWAIT: the data is
 * in the page cache). Returns the bytes read (possibly short, 0 at end of file), or -1 when the
 * read would block (EAGAIN). Throws (ENOTSUP, EINVAL, ...) where the file or kernel cannot do it.
 *
 * This runs on the event-loop thread: a cached 4 KiB read costs about a microsecond, far less than a
 * round trip through libuv's thread pool. Never use it on an O_DIRECT file, where it would wait for
 * the device.
 */
export function preadNowait(fd: number, buf: Buffer, offset: number): number {
  const n = Number(c.preadv2(fd, { iov_base: buf, iov_len: buf.length }, 1, offset, RWF_NOWAIT));
  if (n >= 0) return n;
  const errno = lastErrno();
  if (errno === EAGAIN) return -1;
  throw sysError('preadv2', errno, 'RWF_NOWAIT');
}

export const MADV_DONTNEED = 4;

/** madvise(2) on `[start, end)` (page-aligned addresses of this process). */
export function madvise(start: number, end: number, advice: number): void {
  if (c.madvise(start, end - start, advice) !== 0) throw sysError('madvise', lastErrno(), `0x${start.toString(16)}, ${end - start}, ${advice}`);
}

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  if (c.fallocate(fd, mode, offset, length) !== 0) {
    throw sysError('fallocate', lastErrno(), `mode=0x${mode.toString(16)}`);
  }
}

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

/** Non-blocking advisory lock; returns false when another open file description holds it. */
export function tryFlock(fd: number, operation: number): boolean {
  if (c.flock(fd, operation | LOCK_NB) === 0) return true;
  const errno = lastErrno();
  if (errno === 11 /* EWOULDBLOCK */) return false;
  throw sysError('flock', errno);
}

const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;

/** Takes a shared open-file-description lock on byte `offset` (what qemu's image locking uses); false when a conflicting lock is held. */
export function tryOfdReadLock(fd: number, offset: number): boolean {
  const fl = { l_type: F_RDLCK, l_whence: 0, l_start: offset, l_len: 1, l_pid: 0 };
  if (c.fcntlLock(fd, F_OFD_SETLK, fl) === 0) return true;
  const errno = lastErrno();
  if (errno === 11 /* EAGAIN */ || errno === 13 /* EACCES */) return false;
  throw sysError('fcntl(F_OFD_SETLK)', errno);
}

/** Whether another open file description holds any lock on byte `offset`. */
export function ofdLockedByOther(fd: number, offset: number): boolean {
  const fl = { l_type: F_WRLCK, l_whence: 0, l_start: offset, l_len: 1, l_pid: 0 };
  if (c.fcntlLock(fd, F_OFD_GETLK, fl) !== 0) throw sysError('fcntl(F_OFD_GETLK)', lastErrno());
  return fl.l_type !== F_UNLCK;
}

export function unlock(fd: number): void {
  c.flock(fd, LOCK_UN);
}

/** BLKGETSIZE64 = _IOR(0x12, 114, size_t). */
const BLKGETSIZE64 = 0x80081272;

export function blockDeviceSize(fd: number): number {
  const out = [0n];
  if (c.ioctlU64(fd, BLKGETSIZE64, out) !== 0) throw sysError('ioctl', lastErrno(), 'BLKGETSIZE64');
  return Number(out[0]);
}

/** BLKDISCARD = _IO(0x12, 119); its argument is `uint64_t range[2] = {offset, length}`. */
const BLKDISCARD = 0x1277;

/**
 * Discards a byte range of a block device (offset and length aligned to its logical block size,
 * else EINVAL; EOPNOTSUPP when the device cannot discard). Synchronous: the kernel waits for the
 * device, which is quick for thin devices and SSDs.
 */
export function blockDeviceDiscard(fd: number, offset: number, length: number): void {
  if (c.ioctlRange(fd, BLKDISCARD, [BigInt(offset), BigInt(length)]) !== 0) {
    throw sysError('ioctl', lastErrno(), 'BLKDISCARD');
  }
}

/**
 * A new buffer of `length` bytes whose memory starts on a multiple of `alignment` (a power of two),
 * as O_DIRECT needs. It is a view into a private allocation `alignment` bytes larger; contents are
 * uninitialised. Safety: V8 never moves a buffer's backing store, so the address stays aligned for
 * the buffer's whole life.
 */
export function alignedBuffer(length: number, alignment: number): Buffer {
  const raw = Buffer.allocUnsafeSlow(length + alignment);
  const misalign = Number(koffi.address(raw) % BigInt(alignment));
  const start = misalign === 0 ? 0 : alignment - misalign;
  return raw.subarray(start, start + length);
}

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_CLOEXEC = 0o2000000;
const MSG_NOSIGNAL = 0x4000;

/** `struct sockaddr_un` for `path`; a leading '@' names an abstract socket (Linux). */
export function unixAddress(path: string): Buffer {
  const name = Buffer.from(path.startsWith('@') ? `\0${path.slice(1)}` : path);
  if (name.length > 107) throw new NbddError(Errno.ENAMETOOLONG, `unix socket path '${path}' is longer than 107 bytes`);
  const addr = Buffer.alloc(2 + name.length + (path.startsWith('@') ? 0 : 1));
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, 2);
  return addr;
}

/** Sends one datagram to the AF_UNIX datagram socket at `path` (connectionless, not waiting). */
export function sendUnixDatagram(path: string, data: Buffer): void {
  const addr = unixAddress(path);
  const fd = c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw sysError('socket', lastErrno());
  try {
    if ((c.sendto(fd, data, data.length, MSG_NOSIGNAL, addr, addr.length) as number) < 0) throw sysError('sendto', lastErrno(), path);
  } finally {
    c.close(fd);
  }
}

/** The path an AF_UNIX socket is bound to (`@name` for an abstract one); null for other sockets. */
export function unixSocketPath(fd: number): string | null {
  const addr = Buffer.alloc(110);
  const len = [addr.length];
  if (c.getsockname(fd, addr, len) !== 0) throw sysError('getsockname', lastErrno());
  if (addr.readUInt16LE(0) !== AF_UNIX) return null;
  const name = addr.subarray(2, len[0]);
  if (name[0] === 0) return `@${name.subarray(1).toString()}`;
  const nul = name.indexOf(0);
  return name.subarray(0, nul < 0 ? name.length : nul).toString();
}

/** An ioctl that takes no argument (e.g. BLKRRPART). */
export function ioctlNoArg(fd: number, request: number, what: string): void {
  if (c.ioctlNone(fd, request, 0) !== 0) throw sysError(what, lastErrno());
}

/** A connected AF_UNIX stream socket pair, close-on-exec. */
export function socketPair(): [number, number] {
  const sv = [0, 0];
  if (c.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) !== 0) {
    throw sysError('socketpair', lastErrno());
  }
  return [sv[0]!, sv[1]!];
}

export function closeFd(fd: number): void {
  c.close(fd);
}

export function getEuid(): number {
  return c.geteuid() as number;
}

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/** The credentials of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED). */
export function peerCredentials(fd: number): PeerCredentials {
  const ucred = Buffer.alloc(12); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = [ucred.length];
  if (c.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred, len) !== 0) throw sysError('getsockopt', lastErrno(), 'SO_PEERCRED');
  return { pid: ucred.readInt32LE(0), uid: ucred.readUInt32LE(4), gid: ucred.readUInt32LE(8) };
}

const O_CLOEXEC = 0o2000000;
const F_SETPIPE_SZ = 1031;
const F_GETPIPE_SZ = 1032;
export const SPLICE_F_MOVE = 1;
export const SPLICE_F_NONBLOCK = 2;

/** A pipe, close-on-exec: [read end, write end]. */
export function makePipe(): [number, number] {
  const fds = [0, 0];
  if (c.pipe2(fds, O_CLOEXEC) !== 0) throw sysError('pipe2', lastErrno());
  return [fds[0]!, fds[1]!];
}

/**
 * Asks for a pipe of `bytes` (F_SETPIPE_SZ; above /proc/sys/fs/pipe-max-size only with
 * CAP_SYS_RESOURCE) and returns what it got (F_GETPIPE_SZ).
 */
export function resizePipe(fd: number, bytes: number): number {
  c.fcntlInt(fd, F_SETPIPE_SZ, bytes);
  const got = c.fcntlInt(fd, F_GETPIPE_SZ, 0) as number;
  if (got < 0) throw sysError('fcntl', lastErrno(), 'F_GETPIPE_SZ');
  return got;
}

/**
 * splice(2) between a pipe and a socket (either way) with SPLICE_F_NONBLOCK, at no offsets:
 * returns the bytes moved, 0 at the end of the input, or -errno (-EAGAIN when the output has no
 * room, or the input, non-blocking, has no bytes).
 */
export function spliceStreams(fdIn: number, fdOut: number, length: number, flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK): number {
  const r = Number(c.splice(fdIn, null, fdOut, null, length, flags));
  return r >= 0 ? r : -lastErrno();
}

/** splice(2) of `length` bytes of the file `fd` at `offset` into the pipe `pipeFd`: bytes moved, or -errno. */
export function spliceToPipe(fd: number, offset: number, pipeFd: number, length: number): number {
  const r = Number(c.splice(fd, [offset], pipeFd, null, length, SPLICE_F_MOVE | SPLICE_F_NONBLOCK));
  return r >= 0 ? r : -lastErrno();
}

const SO_SNDBUF = 7;
const SO_SNDBUFFORCE = 32;
const SO_DOMAIN = 39;

/**
 * Gives a unix-domain stream socket a send buffer of `bytes` (the kernel doubles it for its
 * bookkeeping): SO_SNDBUFFORCE where we may (CAP_NET_ADMIN), else SO_SNDBUF, which the kernel
 * caps at net.core.wmem_max. Other sockets are left alone: TCP sizes its buffers itself, and a
 * fixed size would turn that off. Best effort; returns whether the socket is unix-domain.
 */
export function setUnixSendBuffer(fd: number, bytes: number): boolean {
  const domain = Buffer.alloc(4);
  if (c.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, domain, [4]) !== 0 || domain.readInt32LE(0) !== AF_UNIX) return false;
  if (c.setsockoptInt(fd, SOL_SOCKET, SO_SNDBUFFORCE, [bytes], 4) !== 0) c.setsockoptInt(fd, SOL_SOCKET, SO_SNDBUF, [bytes], 4);
  return true;
}

/** A socket's send buffer (SO_SNDBUF: what the kernel accounts, twice what was asked). */
export function sendBufferSize(fd: number): number {
  const v = Buffer.alloc(4);
  if (c.getsockopt(fd, SOL_SOCKET, SO_SNDBUF, v, [4]) !== 0) throw sysError('getsockopt', lastErrno(), 'SO_SNDBUF');
  return v.readInt32LE(0);
}
