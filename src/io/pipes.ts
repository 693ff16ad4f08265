/**
 * Pipes for spliced READ replies and WRITE payloads (docs/io-engine.md, "Spliced reads", "Spliced
 * writes").
 *
 * A large READ on a raw image served to a socket can skip two of its three copies: the backend
 * splices the file's page-cache pages into a pipe by reference (no copy), and the reply splices
 * them from the pipe into the socket (by reference again); the peer's receive is the one copy. A
 * large WRITE skips our receive's copy: the socket's pages go into a pipe, and the pipe into the
 * file. This pool hands out pipes big enough for one such request, and takes them back empty.
 *
 * A pipe holds its data as page references, so the bytes a reply sends are the file's at the
 * moment the peer copies them, which is still inside that READ's lifetime (it ends when the peer
 * has the data). That is why only stacks whose every layer says so may splice (`Backend.spliceRead`):
 * a backup's point-in-time view must not, since a later write to the live disk would show through.
 */
import { logger } from '../core/log.js';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { readSync } from 'node:fs';
import { closeFd, makePipe, resizePipe } from '../sys/libc.js';

const log = logger('io');

/** The size asked of each pipe: 2 MiB (needs CAP_SYS_RESOURCE above pipe-max-size), else 1 MiB. */
const WANT_BYTES = [2 * 1024 * 1024, 1024 * 1024];
/** Pages a pipe slot holds at most (the kernel's page size is at least this). */
const PAGE = 4096;
/** Pipes out at once (two descriptors each); reads beyond that are answered the usual way. */
const MAX_OUT = 64;
/** Empty pipes kept for the next reads. */
const MAX_IDLE = 16;

export interface Pipe {
  readonly readFd: number;
  readonly writeFd: number;
}

class PipePool {
  private readonly idle: Pipe[] = [];
  private out = 0;
  /** Bytes of file pages the pool's pipes take: pipe slots × PAGE (0 until the first pipe is made). */
  private slots = 0;
  private failed = false;

  /**
   * A pipe that takes `length` bytes of a file at `offset` (one slot per page spanned), or null:
   * too many out, too long, or pipes cannot be made here.
   */
  take(offset: number, length: number): Pipe | null {
    if (this.out >= MAX_OUT || this.failed) return null;
    const pages = Math.floor((offset + length - 1) / PAGE) - Math.floor(offset / PAGE) + 1;
    if (this.slots > 0 && pages > this.slots) return null;
    const pipe = this.idle.pop() ?? this.make();
    if (!pipe) return null;
    if (pages > this.slots) {
      this.idle.push(pipe);
      return null;
    }
    this.out++;
    return pipe;
  }

  /** Back to the pool: `pipe` is empty (everything put in was spliced out). */
  give(pipe: Pipe): void {
    this.out--;
    if (this.idle.length < MAX_IDLE) this.idle.push(pipe);
    else close(pipe);
  }

  /** Closes `pipe`: what it holds is unknown (a splice failed half-way). */
  discard(pipe: Pipe): void {
    this.out--;
    close(pipe);
  }

  /** Pipes handed out and not yet back (for tests). */
  get inUse(): number {
    return this.out;
  }

  private make(): Pipe | null {
    try {
      const [readFd, writeFd] = makePipe();
      let bytes = 0;
      for (const want of WANT_BYTES) if ((bytes = resizePipe(writeFd, want)) >= want) break;
      this.slots = Math.floor(bytes / PAGE);
      return { readFd, writeFd };
    } catch (err) {
      this.failed = true;
      log.warn(`spliced reads off: ${messageOf(err)}`);
      return null;
    }
  }
}

/**
 * Reads the `buf.length` bytes `pipe` holds into `buf` and returns it. The caller knows they are
 * there, so the read never waits (the pipe is a blocking one).
 */
export function readOut(pipe: Pipe, buf: Buffer): Buffer {
  for (let done = 0; done < buf.length; ) {
    const n = readSync(pipe.readFd, buf, done, buf.length - done, null);
    if (n <= 0) throw new NbddError(Errno.EIO, `pipe held ${done} bytes, not ${buf.length}`);
    done += n;
  }
  return buf;
}

function close(pipe: Pipe): void {
  closeFd(pipe.readFd);
  closeFd(pipe.writeFd);
}

/** The process's pipes. */
export const pipes = new PipePool();
