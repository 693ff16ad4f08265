/**
 * The ublk half of the native addon (native/ublk.c): control commands on a pool thread; a hardware
 * queue on the event-loop thread (loop) or on a pthread of its own (thread). Buffer ownership is documented there ("Safety").
 */
import { createRequire } from 'node:module';
import { Errno, NbddError } from '../core/errors.js';

const ADDON_PATH = '../../native/build/Release/nbdd_uring.node';

export type QueueHandle = { readonly __ublkQueue: unique symbol };
export type LoopQueueHandle = { readonly __ublkLoopQueue: unique symbol };

export const QUEUE_EVENT = { READY: 0, REQUESTS: 1, EXITED: 2 } as const;

export interface UblkAddon {
  /** Resolves with cqe.res (0 or -errno); rejects with `errno` set when the command could not be issued. */
  ublkCtrl(cmdOp: number, devId: number, queueId: number, buffer: Buffer | null, data0: number, devPathLen: number): Promise<number>;
  ublkQueueStart(
    cdevFd: number,
    qid: number,
    depth: number,
    maxIo: number,
    buffer: Buffer,
    fetchOp: number,
    commitOp: number,
    onEvent: (kind: number, code: number, extra: number, records: Uint32Array | null) => void,
  ): QueueHandle;
  /** `pairs` holds (tag, result as u32) pairs; the first `count` are taken. */
  ublkComplete(queue: QueueHandle, pairs: Uint32Array, count: number): void;
  ublkQueueStop(queue: QueueHandle): void;
  /** The queue served on the event-loop thread; throws (with `errno`) when the FETCHes cannot be queued. */
  ublkLoopQueueStart(
    cdevFd: number,
    qid: number,
    depth: number,
    maxIo: number,
    buffer: Buffer,
    fetchOp: number,
    commitOp: number,
    records: Uint32Array,
    onEvent: (kind: number, value: number) => void,
  ): LoopQueueHandle;
  /** Queues COMMIT_AND_FETCH for a delivered tag; false when the tag is not ours or the queue is closed. */
  ublkLoopCommit(queue: LoopQueueHandle, tag: number, result: number): boolean;
  ublkLoopStop(queue: LoopQueueHandle): void;
}

let addon: UblkAddon | null | undefined;

export function ublkAddon(): UblkAddon {
  if (addon === undefined) {
    try {
      const a = createRequire(import.meta.url)(ADDON_PATH) as Partial<UblkAddon>;
      addon = typeof a.ublkCtrl === 'function' ? (a as UblkAddon) : null;
    } catch {
      addon = null;
    }
  }
  if (!addon) {
    throw new NbddError(Errno.ENOSYS, 'ublk needs the native addon (native/, built by `npm ci`); it is missing or too old: run `npm run build:native`');
  }
  return addon;
}
