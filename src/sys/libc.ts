/**
 * The few system calls Node does not expose, through koffi (see docs/architecture.md, "Native
 * code thin"). Each wrapper throws an `NbddError` carrying the C errno on failure.
 *
 * Only slow-path or per-request-cheap calls live here; nothing in this file blocks for long
 * (lseek on SEEK_DATA/SEEK_HOLE, fallocate, flock with LOCK_NB, ioctl, socketpair).
 */
import koffi from 'koffi';
import { NbddError, nameOfErrno } from '../core/errors.js';

const lib = koffi.load('libc.so.6');

const c = {
  errnoLocation: lib.func('int *__errno_location()'),
  lseek: lib.func('int64_t lseek(int fd, int64_t offset, int whence)'),
  fallocate: lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)'),
  flock: lib.func('int flock(int fd, int operation)'),
  ioctlU64: lib.func('int ioctl(int fd, unsigned long request, _Out_ uint64_t *out)'),
  socketpair: lib.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  close: lib.func('int close(int fd)'),
  getuid: lib.func('uint32_t getuid()'),
  geteuid: lib.func('uint32_t geteuid()'),
  getsockopt: lib.func('int getsockopt(int fd, int level, int optname, void *optval, _Inout_ uint32_t *optlen)'),
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

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_CLOEXEC = 0o2000000;

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
