/**
 * PR_SET_IO_FLUSHER for every thread that does I/O for a device (native/flusher.c): the event
 * loop and libuv's pool now; threads created later (io_uring workers, more pool threads, ublk
 * queue threads) inherit it from their creator. Without it, memory reclaim can wait on writeback
 * to the very device this process serves while this process waits on reclaim — the deadlock
 * block-device daemons guard against (rbd-nbd, ublksrv and nbd-client do the same). It needs
 * CAP_SYS_RESOURCE; without that the daemon runs, with a warning where it serves a local device.
 *
 * Not covered: V8's own platform threads (GC helpers), created before any of our code runs; they
 * do no I/O for the device.
 */
import { createRequire } from 'node:module';
import { logger } from '../core/log.js';
import { nameOfErrno } from '../core/errors.js';

const log = logger('sys');
const ADDON_PATH = '../../native/build/Release/nbdd_uring.node';

interface FlusherAddon {
  setIoFlusher(): number;
  setIoFlusherPool(n: number): Promise<{ errnos: number[]; threads: number }>;
}

function addon(): FlusherAddon | null {
  try {
    const a = createRequire(import.meta.url)(ADDON_PATH) as Partial<FlusherAddon>;
    return typeof a.setIoFlusherPool === 'function' ? (a as FlusherAddon) : null;
  } catch {
    return null;
  }
}

/** libuv's pool size, as libuv reads it (UV_THREADPOOL_SIZE, default 4, at most 1024). */
export function poolSize(): number {
  const n = Number(process.env.UV_THREADPOOL_SIZE);
  return Number.isInteger(n) && n >= 1 ? Math.min(n, 1024) : 4;
}

let done: Promise<boolean> | null = null;

/**
 * Makes this process an I/O flusher once; resolves true when every thread took it. `localDevice`:
 * this process serves a kernel block device on this host (a refusal is then worth a warning).
 */
export function becomeIoFlusher(localDevice: boolean): Promise<boolean> {
  done ??= (async () => {
    const a = addon();
    if (!a) {
      log.warn('PR_SET_IO_FLUSHER not set: the native addon is missing (run `npm run build:native`)');
      return false;
    }
    const pool = await a.setIoFlusherPool(poolSize());
    const errs = [a.setIoFlusher(), ...pool.errnos].filter((e) => e !== 0);
    if (errs.length === 0) {
      log.debug(`PR_SET_IO_FLUSHER set on the event loop and ${pool.threads} pool threads`);
      if (pool.threads < poolSize()) log.warn(`PR_SET_IO_FLUSHER reached ${pool.threads} of ${poolSize()} pool threads (the pool was busy)`);
      return pool.threads >= poolSize();
    }
    const why = `PR_SET_IO_FLUSHER refused (${nameOfErrno(errs[0]!)}; it needs CAP_SYS_RESOURCE)`;
    if (localDevice) log.warn(`${why}: under memory pressure, reclaim may wait on this device`);
    else log.debug(why);
    return false;
  })();
  return done;
}
