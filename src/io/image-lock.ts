/**
 * The one lock policy for image files, raw and qcow2 alike (and every file of a backing chain):
 * an advisory flock, LOCK_EX for a writer and LOCK_SH for a reader, never waiting. So among nbdd
 * processes (and qemu-img/qemu-nbd, which take the same kind of lock only with locking=on) an
 * image has one writer or any number of readers; `nbdd create --force` takes LOCK_EX too before
 * replacing a file, so it never truncates a live image. The lock goes with the fd on close.
 */
import { Errno, NbddError } from '../core/errors.js';
import { LOCK_EX, LOCK_SH, tryFlock } from '../sys/libc.js';

export type LockPurpose = 'read' | 'write' | 'replace';

/** Takes the lock for `purpose` on `fd`, or EBUSY naming `path` and who is in the way. */
export function lockImage(fd: number, path: string, purpose: LockPurpose): void {
  if (tryFlock(fd, purpose === 'read' ? LOCK_SH : LOCK_EX)) return;
  const why = {
    read: 'another process has it open for writing (it holds an exclusive lock)',
    write: 'another process has it open (it holds a lock); refusing to open it for writing',
    replace: 'another process has it open (it holds a lock); not overwriting it',
  }[purpose];
  throw new NbddError(Errno.EBUSY, `${path} is in use: ${why}`);
}
