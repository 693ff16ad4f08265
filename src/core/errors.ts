/**
 * One error type for the whole daemon: every failure that can reach a client carries an errno.
 *
 * Frontends map `errno` to their wire (NBD error field, ublk result) with the tables in
 * `src/nbd/wire/constants.ts` and the ublk frontend; nothing else inspects messages.
 */
import { constants as osConstants } from 'node:os';

export const Errno = {
  EPERM: osConstants.errno.EPERM,
  ENOENT: osConstants.errno.ENOENT,
  ENXIO: osConstants.errno.ENXIO,
  EIO: osConstants.errno.EIO,
  EBADF: osConstants.errno.EBADF,
  EAGAIN: osConstants.errno.EAGAIN,
  ENOMEM: osConstants.errno.ENOMEM,
  EACCES: osConstants.errno.EACCES,
  EBUSY: osConstants.errno.EBUSY,
  EADDRINUSE: osConstants.errno.EADDRINUSE,
  EEXIST: osConstants.errno.EEXIST,
  ENODEV: osConstants.errno.ENODEV,
  EINVAL: osConstants.errno.EINVAL,
  EFBIG: osConstants.errno.EFBIG,
  ENOSPC: osConstants.errno.ENOSPC,
  EROFS: osConstants.errno.EROFS,
  ERANGE: osConstants.errno.ERANGE,
  ENOSYS: osConstants.errno.ENOSYS,
  ELOOP: osConstants.errno.ELOOP,
  EOVERFLOW: osConstants.errno.EOVERFLOW,
  ENOTSUP: osConstants.errno.ENOTSUP,
  ENAMETOOLONG: osConstants.errno.ENAMETOOLONG,
  ESHUTDOWN: 108, // Linux value; not in os.constants.errno
  ETIMEDOUT: osConstants.errno.ETIMEDOUT,
  ECONNRESET: osConstants.errno.ECONNRESET,
  EPROTO: osConstants.errno.EPROTO,
  EUCLEAN: 117, // Linux value ("structure needs cleaning"): corrupt image
} as const;

const errnoNames: Map<number, string> = new Map(
  Object.entries(osConstants.errno).map(([name, value]) => [value as number, name]),
);

errnoNames.set(108, 'ESHUTDOWN');
errnoNames.set(117, 'EUCLEAN');

export function nameOfErrno(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

/** An error with an errno. `message` is for humans (logs, CLI); `errno` is for the wire. */
export class NbddError extends Error {
  readonly errno: number;
  constructor(errno: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbddError';
    this.errno = errno;
  }
  get code(): string {
    return nameOfErrno(this.errno);
  }
}

/**
 * The errno of any thrown value: NbddError's own, a Node system error's (`err.errno` is negative
 * in Node, `err.code` is the name), else EIO.
 */
export function errnoOf(err: unknown): number {
  if (err instanceof NbddError) return err.errno;
  if (err && typeof err === 'object') {
    const e = err as { errno?: unknown; code?: unknown };
    if (typeof e.code === 'string') {
      const value = (osConstants.errno as Record<string, number>)[e.code];
      if (typeof value === 'number') return value;
    }
    if (typeof e.errno === 'number' && e.errno !== 0) return Math.abs(e.errno);
  }
  return Errno.EIO;
}

/**
 * A file system error as nbdd says it: `cannot open PATH: no such file or directory` (the errno
 * kept), rather than Node's "ENOENT: no such file or directory, open 'PATH'". NbddErrors pass.
 */
export function fileError(path: string, err: unknown, what = 'cannot open'): NbddError {
  if (err instanceof NbddError) return err;
  const reason = messageOf(err).replace(/^E[A-Z]+: /, '').replace(/, \w+ '.*'$/, '');
  return new NbddError(errnoOf(err), `${what} ${path}: ${reason}`, { cause: err });
}

export function messageOf(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/** Throws EINVAL-style internal contract violations; for conditions validated at the edge. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new NbddError(Errno.EIO, `internal assertion failed: ${message}`);
}
