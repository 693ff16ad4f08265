/**
 * The sidecar of one device or served export NAME: a private directory (mode 0700, default
 * /run/nbdd/NAME) holding
 *
 *   nbd.sock      an NBD server: export NAME (read-only unless asked otherwise) with the meta
 *                 contexts base:allocation, qemu:allocation-depth and qemu:dirty-bitmap:<bitmap>
 *                 for every bitmap; during a backup also the point-in-time export NAME-backup
 *   control.sock  JSON-RPC 2.0 control (see docs/control-api.md)
 *
 * The sidecar shares the device's BlockQueue and layer stack: reads on nbd.sock go through the
 * same queue as the device's own I/O, so they see every acknowledged write.
 */
import { remoteLinkOf, type RemoteLink } from '../backends/remote.js';
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import type { BitmapSet } from '../bitmaps/bitmap-set.js';
import type { DirtyBitmap } from '../bitmaps/dirty-bitmap.js';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { checkName, sidecarDir } from '../core/paths.js';
import { BlockQueue } from '../core/queue.js';
import { ControlServer } from '../control/control-server.js';
import { DeviceEvents, DirtyCoalescer } from '../control/events.js';
import { deviceMethods, type BackupBeginParams, type ControlledDevice } from '../control/methods.js';
import { bitmapContext } from '../layers/dirty-tracking.js';
import type { FleecingView } from '../layers/copy-before-write.js';
import { NbdExport } from '../nbd/server/export.js';
import { NbdServer } from '../nbd/server/server.js';
import { getEuid } from '../sys/libc.js';
import type { DeviceStack } from '../runtime/stack.js';

const log = logger('sidecar');

export const NBD_SOCKET = 'nbd.sock';
export const CONTROL_SOCKET = 'control.sock';

export interface SidecarOptions {
  name: string;
  /** The directory (default `sidecarDir(name)`: `$NBDD_RUN_DIR/NAME`, else /run/nbdd/NAME). */
  dir?: string;
  /** The device's stack: its queue becomes the live export, its bitmaps and fleecing the rest. */
  stack: DeviceStack;
  /** Offer the live export writable on nbd.sock (default read-only). */
  writable?: boolean;
  /** Peer uids allowed on control.sock besides root (default the daemon's euid). */
  allowedUids?: number[];
  /** Frontend details merged into `status` (e.g. the kernel device, link state). */
  frontendStatus?: () => Record<string, unknown>;
}

interface Backup {
  exportName: string;
  bitmap: string | null;
  view: FleecingView;
  queue: BlockQueue;
  frozen: DirtyBitmap | null;
  started: string;
}

export class Sidecar implements ControlledDevice {
  readonly name: string;
  readonly dir: string;
  readonly events = new DeviceEvents();
  readonly bitmaps: BitmapSet;
  private readonly options: SidecarOptions;
  private readonly nbd = new NbdServer({ maxConnections: 16 });
  private readonly control: ControlServer;
  private backup: Backup | null = null;
  private readonly detach: (() => void)[] = [];

  private constructor(options: SidecarOptions, dir: string) {
    this.options = options;
    this.name = options.name;
    this.dir = dir;
    this.bitmaps = options.stack.bitmaps;
    this.control = new ControlServer(deviceMethods(this), { allowedUids: options.allowedUids });
  }

  get nbdSocket(): string {
    return join(this.dir, NBD_SOCKET);
  }

  get controlSocket(): string {
    return join(this.dir, CONTROL_SOCKET);
  }

  /** Creates the directory and starts both sockets. */
  static async start(options: SidecarOptions): Promise<Sidecar> {
    checkName(options.name);
    const dir = options.dir ?? sidecarDir(options.name);
    await preparePrivateDir(dir);
    const sidecar = new Sidecar(options, dir);
    try {
      await sidecar.listen();
    } catch (err) {
      await sidecar.close();
      throw err;
    }
    return sidecar;
  }

  private async listen(): Promise<void> {
    const { stack } = this.options;
    const bitmaps = stack.bitmaps;
    this.nbd.addExport(
      new NbdExport({
        name: this.name,
        description: `nbdd ${this.name} (${stack.image.kind})`,
        queue: stack.queue,
        readOnly: !this.options.writable,
        ownsQueue: false,
        extraContexts: () => stack.metaContexts(),
      }),
    );
    const coalescer = new DirtyCoalescer((extents) => this.events.publish('dirty', { extents }));
    const onDirty = (offset: number, length: number): void => {
      if (this.events.wanted('dirty')) coalescer.add(offset, length);
    };
    const onPersistError = (err: Error): void => this.events.publish('error', { message: `dirty bitmap: ${err.message}` });
    const onBackupError = (message: string): void => this.events.publish('backup-error', { message });
    bitmaps.on('dirty', onDirty);
    bitmaps.on('persist-error', onPersistError);
    stack.fleecing.on('backup-error', onBackupError);
    this.detach.push(
      () => bitmaps.off('dirty', onDirty),
      () => bitmaps.off('persist-error', onPersistError),
      () => stack.fleecing.off('backup-error', onBackupError),
    );
    await this.nbd.listenUnix(this.nbdSocket);
    await fsp.chmod(this.nbdSocket, 0o600);
    await this.control.listen(this.controlSocket);
    log.info(`sidecar for '${this.name}' in ${this.dir}`);
  }

  /* ------------------------------------------------------------ ControlledDevice */

  status(): Record<string, unknown> {
    const { stack } = this.options;
    const { queue, bitmaps } = stack;
    return {
      name: this.name,
      size: stack.image.size,
      backend: stack.image.kind,
      readOnly: stack.image.caps.readOnly,
      sidecar: { dir: this.dir, nbdSocket: this.nbdSocket, controlSocket: this.controlSocket, nbdConnections: this.nbd.connectionCount },
      exports: this.nbd.listExports().map((e) => ({ name: e.name, readOnly: e.readOnly })),
      bitmapStore: bitmaps.store ? { kind: bitmaps.store.kind, location: bitmaps.store.location } : null,
      bitmaps: bitmaps.list(),
      backup: this.backup
        ? { export: this.backup.exportName, bitmap: this.backup.bitmap, started: this.backup.started, ...this.backup.view.stats() }
        : null,
      queueDepth: queue.depth,
      ...remoteStatus(remoteLinkOf(stack.image)),
      ...(this.options.frontendStatus?.() ?? {}),
    };
  }

  stats(): Record<string, unknown> {
    const { stack } = this.options;
    return { since: stack.stats.since.toISOString(), queueDepth: stack.queue.depth, ops: stack.stats.snapshot() };
  }

  /**
   * Starts a backup: a copy-before-write view of the disk as it is now, exported on nbd.sock as
   * NAME-backup (read-only; TRIM releases ranges), with the frozen bitmap as its
   * qemu:dirty-bitmap context when one is named.
   */
  async backupBegin(params: BackupBeginParams): Promise<Record<string, unknown>> {
    if (this.backup) throw new NbddError(Errno.EBUSY, `a backup of '${this.name}' is running (export '${this.backup.exportName}')`);
    const { stack } = this.options;
    const bitmaps = stack.bitmaps;
    if (params.bitmap !== undefined && !bitmaps.has(params.bitmap)) throw new NbddError(Errno.ENOENT, `no bitmap named '${params.bitmap}'`);
    // Everything below runs in one synchronous stretch: the view and the frozen bitmap describe
    // the same instant (no write can complete in between).
    const view = stack.fleecing.begin({
      granularity: params.granularity,
      onLimit: params.onLimit,
      scratch: {
        ...(params.scratchMemoryBytes !== undefined ? { memoryBytes: params.scratchMemoryBytes } : {}),
        ...(params.scratchFileBytes !== undefined ? { fileBytes: params.scratchFileBytes } : {}),
      },
    });
    const frozen = params.bitmap !== undefined ? bitmaps.freeze(params.bitmap) : null;
    const bitmapName = params.bitmap ?? null;
    const exportName = `${this.name}-backup`;
    const queue = new BlockQueue(view);
    this.nbd.addExport(
      new NbdExport({
        name: exportName,
        description: `point-in-time view of ${this.name}`,
        queue,
        extraContexts: () => (frozen && bitmapName !== null ? [bitmapContext(bitmapName, () => frozen)] : []),
      }),
    );
    this.backup = { exportName, bitmap: bitmapName, view, queue, frozen, started: new Date().toISOString() };
    log.info(`backup of '${this.name}' started: export '${exportName}'${bitmapName ? `, bitmap '${bitmapName}'` : ''}`);
    return { export: exportName, bitmap: bitmapName, size: stack.image.size, granularity: view.granularity };
  }

  async backupEnd(): Promise<void> {
    const b = this.backup;
    if (!b) throw new NbddError(Errno.ENOENT, `no backup of '${this.name}' is running`);
    this.backup = null;
    this.nbd.removeExport(b.exportName);
    if (b.bitmap !== null) this.options.stack.bitmaps.release(b.bitmap);
    await this.options.stack.fleecing.end();
    await b.queue.close().catch((err) => log.warn(`closing the backup export: ${messageOf(err)}`));
    log.info(`backup of '${this.name}' ended`);
  }

  /** Ends a running backup, stops both sockets, removes them (not the device's queue). */
  async close(): Promise<void> {
    if (this.backup) await this.backupEnd();
    for (const d of this.detach.splice(0)) d();
    await this.control.close();
    // The live export does not own the device's queue; the backup export owns its own.
    await this.nbd.close();
    await fsp.rmdir(this.dir).catch(() => undefined);
  }
}

/**
 * Makes `dir` a private directory of ours: created 0700 if missing (parents 0755); if present it
 * must be a real directory owned by our euid, and is set to 0700.
 */
async function preparePrivateDir(dir: string): Promise<void> {
  await fsp.mkdir(join(dir, '..'), { recursive: true, mode: 0o755 });
  await fsp.mkdir(dir, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'EEXIST') throw err;
  });
  const st = await fsp.lstat(dir);
  if (!st.isDirectory()) throw new NbddError(Errno.EEXIST, `${dir} exists and is not a directory`);
  if (st.uid !== getEuid()) throw new NbddError(Errno.EPERM, `${dir} belongs to uid ${st.uid}, not to us`);
  await fsp.chmod(dir, 0o700);
}

/** `remote` in status: the NBD server the device's data (or its backing file) lives on. */
function remoteStatus(link: RemoteLink | null): { remote?: { uri: string; state: string; reconnects: number } } {
  return link ? { remote: { uri: link.remoteUri, state: link.remoteState, reconnects: link.reconnects } } : {};
}
