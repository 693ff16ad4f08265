/**
 * The control methods of one device or export (documented with examples in docs/control-api.md).
 * Each entry names its parameters (checked before the handler runs) and calls the device.
 */
import { Errno, NbddError } from '../core/errors.js';
import type { BitmapSet } from '../bitmaps/bitmap-set.js';
import type { OnScratchLimit } from '../layers/copy-before-write.js';
import type { ControlConnection } from './control-server.js';
import { EVENT_TYPES, type DeviceEvents, type EventType } from './events.js';
import { RPC_ERROR, RpcError, type MethodTable } from './jsonrpc.js';

export interface BackupBeginParams {
  /** Bitmap to freeze and publish on the backup export as `qemu:dirty-bitmap:NAME`. */
  bitmap?: string;
  /** Copy-before-write granularity in bytes. */
  granularity?: number;
  scratchMemoryBytes?: number;
  scratchFileBytes?: number;
  onLimit?: OnScratchLimit;
}

/** What the control socket needs from a device (the sidecar implements it). */
export interface ControlledDevice {
  readonly name: string;
  status(): Record<string, unknown>;
  stats(): Record<string, unknown>;
  /** Null when the device has no bitmaps support (never for nbdd devices; kept for tests). */
  readonly bitmaps: BitmapSet | null;
  readonly events: DeviceEvents;
  backupBegin(params: BackupBeginParams): Promise<Record<string, unknown>>;
  backupEnd(): Promise<void>;
}

function bitmapsOf(device: ControlledDevice): BitmapSet {
  if (!device.bitmaps) throw new NbddError(Errno.ENOTSUP, `${device.name} has no dirty bitmaps`);
  return device.bitmaps;
}

export function deviceMethods(device: ControlledDevice): MethodTable<ControlConnection> {
  const subscriptions = new WeakMap<ControlConnection, () => void>();
  return {
    status: { params: {}, handler: () => device.status() },
    stats: { params: {}, handler: () => device.stats() },

    'bitmap.list': { params: {}, handler: () => bitmapsOf(device).list() },
    'bitmap.add': {
      params: { name: 'string', granularity: 'integer?', disabled: 'boolean?', persistent: 'boolean?' },
      handler: (p) =>
        bitmapsOf(device).add(p.name as string, {
          granularity: p.granularity as number | undefined,
          enabled: !(p.disabled as boolean | undefined),
          persistent: p.persistent as boolean | undefined,
        }),
    },
    'bitmap.remove': { params: { name: 'string' }, handler: (p) => bitmapsOf(device).remove(p.name as string) },
    'bitmap.clear': { params: { name: 'string' }, handler: (p) => bitmapsOf(device).clear(p.name as string) },
    'bitmap.enable': { params: { name: 'string' }, handler: (p) => bitmapsOf(device).enable(p.name as string) },
    'bitmap.disable': { params: { name: 'string' }, handler: (p) => bitmapsOf(device).disable(p.name as string) },
    'bitmap.merge': {
      params: { target: 'string', sources: 'string[]' },
      handler: (p) => bitmapsOf(device).merge(p.target as string, p.sources as string[]),
    },
    checkpoint: {
      params: { name: 'string', granularity: 'integer?', disable: 'string[]?' },
      handler: (p) =>
        bitmapsOf(device).checkpoint(p.name as string, {
          granularity: p.granularity as number | undefined,
          disable: p.disable as string[] | undefined,
        }),
    },

    'backup.begin': {
      params: { bitmap: 'string?', granularity: 'integer?', scratchMemoryBytes: 'integer?', scratchFileBytes: 'integer?', onLimit: 'string?' },
      handler: (p) => {
        if (p.onLimit !== undefined && p.onLimit !== 'break-backup' && p.onLimit !== 'fail-write') {
          throw new RpcError(RPC_ERROR.INVALID_PARAMS, "parameter 'onLimit' must be 'break-backup' or 'fail-write'");
        }
        return device.backupBegin(p as BackupBeginParams);
      },
    },
    'backup.end': { params: {}, handler: () => device.backupEnd() },

    'events.subscribe': {
      params: { types: 'string[]?' },
      handler: (p, conn) => {
        const types = (p.types as string[] | undefined) ?? [...EVENT_TYPES];
        for (const t of types) {
          if (!(EVENT_TYPES as readonly string[]).includes(t)) throw new RpcError(RPC_ERROR.INVALID_PARAMS, `unknown event type '${t}'`);
        }
        subscriptions.get(conn)?.();
        const unsubscribe = device.events.subscribe(types as EventType[], (e) => conn.notify('event', e));
        const removeCleanup = conn.onClose(unsubscribe);
        subscriptions.set(conn, () => {
          unsubscribe();
          removeCleanup();
        });
        return { types };
      },
    },
    'events.unsubscribe': {
      params: {},
      handler: (_p, conn) => {
        subscriptions.get(conn)?.();
        subscriptions.delete(conn);
        return null;
      },
    },
  };
}
