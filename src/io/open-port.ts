/**
 * The one place that chooses the file I/O engine (see docs/io-engine.md).
 *
 * `uring`: UringFilePort on the process-wide io_uring engine, when the native addon is built and
 * the kernel allows io_uring (seccomp filters and `kernel.io_uring_disabled` can forbid it).
 * `threads`: NodeFilePort on libuv's thread pool. The environment variable NBDD_IO_ENGINE=uring or
 * =threads forces one; by default io_uring is used where it works. The probe runs once per process.
 */
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { NodeFilePort, type FilePort } from './file-port.js';
import { UringEngine } from './uring-engine.js';
import { UringFilePort } from './uring-port.js';

export type IoEngineName = 'uring' | 'threads';

export interface OpenPortOptions {
  readOnly: boolean;
  /** O_DIRECT. */
  direct?: boolean;
  /** O_CREAT. */
  create?: boolean;
  /** O_EXCL (with `create`): fail with EEXIST when the file exists. */
  exclusive?: boolean;
}

const log = logger('io');

type Probe = { engine: UringEngine } | { reason: string };
let probe: Probe | null = null;
let announced = false;

/** Sets up the shared ring on first use; remembers why not if it cannot. */
function probeUring(): Probe {
  if (probe) return probe;
  try {
    probe = { engine: UringEngine.create() };
  } catch (err) {
    probe = { reason: messageOf(err).split('\n')[0]! };
  }
  return probe;
}

/** The process's io_uring engine, if file I/O uses one (never sets one up). */
export function sharedEngine(): UringEngine | null {
  return probe && 'engine' in probe ? probe.engine : null;
}

/** NBDD_IO_ENGINE, or null for "choose". Throws EINVAL on any other value. */
function requestedEngine(): IoEngineName | null {
  const v = process.env.NBDD_IO_ENGINE;
  if (v === undefined || v === '') return null;
  if (v === 'uring' || v === 'threads') return v;
  throw new NbddError(Errno.EINVAL, `NBDD_IO_ENGINE must be "uring" or "threads", not "${v}"`);
}

/**
 * Opens `path` as a FilePort on the chosen engine. Throws NbddError: the open's errno, EINVAL for a
 * bad NBDD_IO_ENGINE, ENOTSUP when NBDD_IO_ENGINE=uring and io_uring is unavailable.
 */
export async function openFilePort(path: string, options: OpenPortOptions): Promise<FilePort> {
  const requested = requestedEngine();
  const uring = requested === 'threads' ? null : probeUring();
  if (uring && 'engine' in uring) {
    announce('io_uring');
    return UringFilePort.open(uring.engine, path, options);
  }
  if (requested === 'uring') {
    throw new NbddError(Errno.ENOTSUP, `NBDD_IO_ENGINE=uring, but io_uring is unavailable: ${uring!.reason}`);
  }
  announce(uring ? `libuv thread pool (io_uring unavailable: ${uring.reason})` : 'libuv thread pool (NBDD_IO_ENGINE=threads)');
  return NodeFilePort.open(path, options);
}

function announce(what: string): void {
  if (announced) return;
  announced = true;
  log.debug(`file I/O engine: ${what}`);
}
