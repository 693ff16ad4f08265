/**
 * `nbdd backup SOURCE --repo DIR`: one point (full or incremental) into a repo (repo.ts).
 *
 * SOURCE is a device or export NAME (its sidecar) or an NBD URI.
 *
 * With a sidecar, the checkpoint protocol keeps incrementals exact across crashes of the daemon
 * and of the backup itself. Point N's bitmap B_N is enabled and persistent: it holds every write
 * since point N began. Backup N+1:
 *
 *   1. `bitmap.add B_N+1`                    — tracking for the next point starts (before T0)
 *   2. `backup.begin {bitmap: B_N}`          — T0: the view, and a frozen copy of B_N; B_N keeps recording
 *   3. copy what the frozen B_N marks (everything for a full point) from the view, TRIM each range
 *   4. sync the point, rename it in, write the manifest — the point exists
 *   5. `backup.end`, `bitmap.remove B_N`
 *
 * Killed anywhere before 4, B_N still holds every change since point N (it was never disabled),
 * so the next backup is again incremental from N and exact; the half-written file and the orphan
 * B_N+1 are removed then. Killed between 4 and 5, the next backup removes B_N. B_N+1 starts before
 * T0, so it is a superset of the writes after T0 (a range written just before T0 is copied twice,
 * never missed). The daemon's bitmaps survive SIGKILL (write-intent), so a daemon crash between
 * backups costs nothing either.
 *
 * With a URI there is no checkpoint: full, or with `--bitmap NAME` the ranges the server's
 * `qemu:dirty-bitmap:NAME` marks (the server's owner manages that bitmap).
 */
import fsp from 'node:fs/promises';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import { logger } from '../core/log.js';
import { openNbd, type NbdBackend } from '../backends/nbd.js';
import { createQcow2 } from '../backends/qcow2/create.js';
import { openQcow2 } from '../backends/qcow2/open.js';
import { checkCompressionType } from '../backends/qcow2/compress.js';
import { COMPRESSION_DEFLATE, COMPRESSION_ZSTD } from '../backends/qcow2/format/index.js';
import { callOn, ControlClient } from '../control/control-client.js';
import { isNbdUri } from '../nbd/uri.js';
import { controlSocketOf } from '../sidecar/locate.js';
import { DIRTY_BITMAP_CONTEXT_PREFIX } from '../nbd/wire/contexts.js';
import { changedBlocks, chunkSums, copyRanges, dirtyRanges, touchedChunks, type Range } from './copy.js';
import { BLOCK_SIZE, diskSum, zeroBlockSum } from './sums.js';
import { Progress } from './progress.js';
import { Repo, type Compression, type Point } from './repo.js';

const log = logger('backup');

const bitmapContext = (name: string): string => `${DIRTY_BITMAP_CONTEXT_PREFIX}${name}`;

export interface BackupOptions {
  repo: string;
  /** A full point even when the repo has one to build on. */
  full?: boolean;
  /** URI sources: read changes from this qemu:dirty-bitmap. */
  bitmap?: string;
  connections?: number;
  progress?: boolean;
  /** Store data as compressed qcow2 clusters with this codec. */
  compress?: Compression;
}

export interface BackupResult {
  point: string;
  kind: 'full' | 'incremental';
  file: string;
  bytesRead: number;
  bytesStored: number;
  zeroBytes: number;
  /** What the point's file takes on disk (allocated bytes, metadata included). */
  fileBytes: number;
  seconds: number;
}

interface SidecarStatus {
  name: string;
  size: number;
  sidecar: { nbdSocket: string };
  backup: { bitmap: string | null } | null;
  bitmaps: { name: string }[];
}

/** Where the bytes come from for one backup, and what happens around the copy. */
interface Session {
  source: NbdBackend;
  /** The dirty bitmap context to read (incremental), or null for everything. */
  context: string | null;
  /** The bitmap the point records (its checkpoint, or the URI bitmap read). */
  bitmap: string | null;
  release?: (r: Range) => Promise<void>;
  /** After the point is committed. */
  committed(): Promise<void>;
  /** After a failure (the point is not in the repo). */
  abandon(): Promise<void>;
}

export async function backup(sourceName: string, options: BackupOptions): Promise<BackupResult> {
  return isNbdUri(sourceName) ? backupUri(sourceName, options) : backupSidecar(sourceName, options);
}

/** The prefix of the bitmaps this repo keeps on a device. */
function bitmapPrefix(repo: Repo): string {
  return `nbdd-backup-${repo.manifest.id.slice(0, 8)}-`;
}

async function backupSidecar(name: string, options: BackupOptions): Promise<BackupResult> {
  let control: ControlClient;
  try {
    control = await ControlClient.connect(controlSocketOf(name));
  } catch (err) {
    throw new NbddError(Errno.ENOENT, `${messageOf(err)}: a backup of a device needs its sidecar (attach, or serve with --name), or give an NBD URI`);
  }
  let repo: Repo | null = null;
  try {
    const status = await callOn<SidecarStatus>(control, 'status');
    repo = await Repo.openForBackup(options.repo, status.name, status.size);
    const prefix = bitmapPrefix(repo);
    const last = repo.last;
    const have = new Set(status.bitmaps.map((b) => b.name));
    const from = !options.full && last?.bitmap && have.has(last.bitmap) ? last.bitmap : null;
    if (!options.full && last && !from) log.warn(`bitmap '${last.bitmap}' of point ${last.id} is not on '${name}': taking a full backup`);
    // A backup of ours that died mid-way leaves its export open and its new bitmap behind.
    if (status.backup) {
      if (!status.backup.bitmap?.startsWith(prefix) && status.backup.bitmap !== null) {
        throw new NbddError(Errno.EBUSY, `a backup of '${name}' is already running (bitmap '${status.backup.bitmap}')`);
      }
      log.warn(`ending a backup of '${name}' left running by a backup that did not finish`);
      await callOn(control, 'backup.end');
    }
    for (const b of status.bitmaps) if (b.name.startsWith(prefix) && b.name !== from) await callOn(control, 'bitmap.remove', { name: b.name });
    const id = repo.nextId();
    const next = `${prefix}${id}`;
    await callOn(control, 'bitmap.add', { name: next });
    let begun: { export: string } | null = null;
    const abandon = async (): Promise<void> => {
      if (begun) await callOn(control, 'backup.end').catch((err) => log.warn(`backup.end: ${messageOf(err)}`));
      await callOn(control, 'bitmap.remove', { name: next }).catch((err) => log.warn(`removing bitmap '${next}': ${messageOf(err)}`));
    };
    let source: NbdBackend;
    try {
      begun = await callOn<{ export: string }>(control, 'backup.begin', from ? { bitmap: from } : {});
      const uri = `nbd+unix:///${encodeURIComponent(begun.export)}?socket=${status.sidecar.nbdSocket}`;
      source = await openNbd(uri, { extraContexts: from ? [bitmapContext(from)] : [], connections: options.connections, reconnectDelayMs: 0 });
    } catch (err) {
      await abandon();
      throw err;
    }
    return await writePoint(repo, name, options, {
      source,
      context: from ? bitmapContext(from) : null,
      bitmap: next,
      release: ([o, l]) => source.trim(o, l),
      committed: async () => {
        await source.close();
        await callOn(control, 'backup.end');
        if (from) await callOn(control, 'bitmap.remove', { name: from });
      },
      abandon: async () => {
        await source.close().catch(() => undefined);
        await abandon();
      },
    });
  } finally {
    repo?.close();
    await control.close();
  }
}

async function backupUri(uri: string, options: BackupOptions): Promise<BackupResult> {
  const source = await openNbd(uri, { readOnly: true, extraContexts: options.bitmap ? [bitmapContext(options.bitmap)] : [], connections: options.connections, reconnectDelayMs: 0 });
  let repo: Repo | null = null;
  try {
    if (options.bitmap && !source.client.info.contexts.has(bitmapContext(options.bitmap))) {
      throw new NbddError(Errno.ENOENT, `${uri} does not offer ${bitmapContext(options.bitmap)} (qemu-nbd -B ${options.bitmap}, or qemu-storage-daemon's bitmaps= option)`);
    }
    repo = await Repo.openForBackup(options.repo, uri, source.size);
    const incremental = !!options.bitmap && !options.full && repo.last !== null;
    return await writePoint(repo, uri, options, {
      source,
      context: incremental ? bitmapContext(options.bitmap!) : null,
      bitmap: options.bitmap ?? null,
      committed: () => source.close(),
      abandon: () => source.close(),
    });
  } catch (err) {
    await source.close().catch(() => undefined);
    throw err;
  } finally {
    repo?.close();
  }
}

/** Copies, sums and commits one point; on any failure the repo is as it was. */
async function writePoint(repo: Repo, sourceName: string, options: BackupOptions, s: Session): Promise<BackupResult> {
  const started = Date.now();
  const time = new Date(started).toISOString();
  const id = repo.nextId();
  const prev = s.context ? repo.last : null;
  const kind = prev ? 'incremental' : 'full';
  const file = `${id}-${kind === 'full' ? 'full' : 'inc'}.qcow2`;
  const partial = repo.partialFile(id);
  const size = s.source.size;
  let committed = false;
  try {
    const compressionType = options.compress === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_DEFLATE;
    if (options.compress) checkCompressionType(compressionType); // before anything is read
    await createQcow2(repo.path(partial), { size, compressionType, ...(prev ? { backing: prev.file, backingFormat: 'qcow2' } : {}) });
    const ranges: Range[] = s.context ? await dirtyRanges(s.source, s.context) : [[0, size]];
    const total = ranges.reduce((n, r) => n + r[1], 0);
    const progress = new Progress(`backup ${kind} ${id}`, total, options.progress ?? false);
    const target = await openQcow2(repo.path(partial), { readOnly: false });
    let copied;
    try {
      copied = await copyRanges(s.source, target, ranges, { incremental: kind === 'incremental', compress: options.compress !== undefined, progress: (d) => progress.update(d), release: s.release });
      await target.flush();
    } finally {
      await target.close();
    }
    progress.done();
    const copiedAt = Date.now();
    const base = prev ? { chunks: prev.chunks, blocks: await repo.blockSumsAt(prev), touched: touchedChunks(copied.extents), changed: changedBlocks(copied.extents) } : null;
    const disk = await openQcow2(repo.path(partial), { readOnly: true });
    let sums;
    try {
      sums = await chunkSums(disk, copied.blocks, base);
    } finally {
      await disk.close();
    }
    const chunks = sums.chunks;
    // A full point records its nonzero blocks (a block on no record is zero); an incremental
    // every block it changed, zeroes too, since they replace what the points below recorded.
    const records = kind === 'full' ? new Map([...sums.computed].filter(([b, sum]) => !sum.equals(zeroBlockSum(Math.min(BLOCK_SIZE, size - b * BLOCK_SIZE))))) : sums.computed;
    const fileBytes = (await fsp.stat(repo.path(partial))).blocks * 512;
    const point: Point = {
      id,
      kind,
      time,
      file,
      backing: prev?.file ?? null,
      source: sourceName,
      virtualSize: size,
      bytes: copied.bytesStored,
      ...(options.compress ? { compression: options.compress } : {}),
      fileBytes,
      bitmap: s.bitmap,
      extents: copied.extents,
      extentSums: 'slices',
      chunks,
      diskSha256: diskSum(chunks),
    };
    log.debug(`point ${id}: copy ${(copiedAt - started) / 1000} s, checksums ${(Date.now() - copiedAt) / 1000} s`);
    await repo.commit(point, partial, records);
    committed = true;
    await s.committed();
    const seconds = (Date.now() - started) / 1000;
    log.info(`point ${id} (${kind}) of '${sourceName}': ${copied.bytesStored} bytes stored, ${copied.zeroBytes} zero, in ${seconds.toFixed(1)} s`);
    return { point: id, kind, file, bytesRead: copied.bytesRead, bytesStored: copied.bytesStored, zeroBytes: copied.zeroBytes, fileBytes, seconds };
  } catch (err) {
    if (!committed) {
      await fsp.rm(repo.path(partial), { force: true });
      await s.abandon();
    }
    throw err;
  }
}
