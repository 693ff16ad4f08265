/**
 * The one lock policy for image files, raw and qcow2 alike (and every file of a backing chain),
 * never waiting, in two kinds at once so that nbdd keeps out of the way of both itself and QEMU:
 *
 * - an advisory flock, LOCK_EX for a writer and LOCK_SH for a reader: among nbdd processes an
 *   image has one writer or any number of readers; `nbdd create --force` takes LOCK_EX too
 *   before replacing a file, so it never truncates a live image;
 * - QEMU's own image locks (block/file-posix.c, `raw_apply_lock_bytes`): shared open-file-
 *   description locks on byte 100 + i for each permission i the opener uses and on byte 200 + i
 *   for each one it does not let others have. nbdd takes them as qemu-nbd does — a writer uses
 *   consistent-read, write, write-unchanged and resize and shares only consistent-read and
 *   write-unchanged; a reader uses consistent-read and shares everything but write and resize —
 *   and checks the bytes of the others first, as QEMU does. So `qemu-img`, `qemu-io`, `qemu-nbd`
 *   and a VM refuse an image nbdd writes ("Failed to get shared "write" lock"; their `-U` reads
 *   anyway), and nbdd refuses an image they write.
 *
 * Both locks go with the fd on close.
 */
import { Errno, NbddError } from '../core/errors.js';
import { LOCK_EX, LOCK_SH, ofdLockedByOther, tryFlock, tryOfdReadLock } from '../sys/libc.js';

export type LockPurpose = 'read' | 'write' | 'replace';

/** QEMU's permission bits (include/block/block-common.h), by their lock byte index. */
const CONSISTENT_READ = 0;
const WRITE = 1;
const WRITE_UNCHANGED = 2;
const RESIZE = 3;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const PERM_BASE = 100;
const SHARED_BASE = 200;

const QEMU_PERMS: Record<'read' | 'write', { use: number[]; unshared: number[] }> = {
  write: { use: [CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE], unshared: [WRITE, RESIZE] },
  read: { use: [CONSISTENT_READ], unshared: [WRITE, RESIZE] },
};

/** Takes the locks for `purpose` on `fd`, or EBUSY naming `path` and who is in the way. */
export function lockImage(fd: number, path: string, purpose: LockPurpose): void {
  if (!tryFlock(fd, purpose === 'read' ? LOCK_SH : LOCK_EX)) {
    const why = {
      read: 'another process has it open for writing (it holds an exclusive lock)',
      write: 'another process has it open (it holds a lock); refusing to open it for writing',
      replace: 'another process has it open (it holds a lock); not overwriting it',
    }[purpose];
    throw new NbddError(Errno.EBUSY, `${path} is in use: ${why}`);
  }
  const perms = QEMU_PERMS[purpose === 'read' ? 'read' : 'write'];
  const conflict = (byte: number, what: string): NbddError =>
    new NbddError(Errno.EBUSY, `${path} is in use: a QEMU program (qemu-nbd, qemu-img, a VM; lock byte ${byte}) ${what}; ${purpose === 'replace' ? 'not overwriting it' : `refusing to open it${purpose === 'write' ? ' for writing' : ''}`}`);
  // As QEMU: take ours, then look for others' that conflict (two openers racing both see each other).
  for (const p of perms.use) if (!tryOfdReadLock(fd, PERM_BASE + p)) throw conflict(PERM_BASE + p, `does not share the ${PERM_NAMES[p]} permission`);
  for (const p of perms.unshared) if (!tryOfdReadLock(fd, SHARED_BASE + p)) throw conflict(SHARED_BASE + p, `holds the ${PERM_NAMES[p]} permission`);
  for (const p of perms.use) if (ofdLockedByOther(fd, SHARED_BASE + p)) throw conflict(SHARED_BASE + p, `does not share the ${PERM_NAMES[p]} permission`);
  for (const p of perms.unshared) if (ofdLockedByOther(fd, PERM_BASE + p)) throw conflict(PERM_BASE + p, `holds the ${PERM_NAMES[p]} permission`);
}
