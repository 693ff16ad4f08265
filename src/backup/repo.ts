/**
 * A backup repository: a directory of qcow2 images, one per point, and `manifest.json`.
 *
 *   DIR/manifest.json        the repo and its points, oldest first (written by rename: never half)
 *   DIR/0001-full.qcow2      a full point
 *   DIR/0002-inc.qcow2       an incremental: a qcow2 overlay whose backing file is "0001-full.qcow2"
 *   DIR/0002.sums            the block sums the point computed (sums.ts), so the next one needs no re-read
 *   DIR/.partial-0003.qcow2  a point being written (removed by the next backup if the writer died)
 *   DIR/lock                 flock'd by whoever writes the repo
 *
 * A point exists once it is in the manifest; its file is renamed into place and synced before the
 * manifest names it. So a backup killed at any moment leaves the repo as it was (plus a partial
 * file), and qemu-img, `nbdd serve` and `nbdd attach --read-only` open any point directly.
 */
import { createHash, randomUUID } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import fsp from 'node:fs/promises';
import { join } from 'node:path';
import { Errno, NbddError } from '../core/errors.js';
import { logger } from '../core/log.js';
import { LOCK_EX, tryFlock } from '../sys/libc.js';
import { BLOCK_SIZE, CHUNK_SIZE, decodeBlockSums, encodeBlockSums, type BlockSums } from './sums.js';

const log = logger('backup');

export const MANIFEST = 'manifest.json';
const FORMAT = 'nbdd-backup-repo';
export { CHUNK_SIZE };

/** One stored range of a point: data with its sum (sums.ts `rangeSum`, or the SHA-256 of its bytes in older points), or zeroes (null). */
export type StoredExtent = [offset: number, length: number, sum: string | null];

export type Compression = 'zstd' | 'deflate';

export interface Point {
  id: string;
  kind: 'full' | 'incremental';
  /** When the backup began (ISO 8601): the instant the point shows. */
  time: string;
  /** The image, relative to the repo directory. */
  file: string;
  /** The previous point's file (the qcow2 backing file), null for a full point. */
  backing: string | null;
  source: string;
  virtualSize: number;
  /** Data bytes stored in this point's file (zero ranges not counted), before compression. */
  bytes: number;
  /** With `--compress`: the codec of its compressed clusters, and the bytes its file takes on disk. */
  compression?: Compression;
  fileBytes?: number;
  /** The dirty bitmap that tracks changes since this point began (sidecar sources), or the one read (URI --bitmap). */
  bitmap: string | null;
  extents: StoredExtent[];
  /** How `extents` are summed: 'slices' (sums.ts `rangeSum`); absent: the SHA-256 of the range's bytes (repos made before). */
  extentSums?: 'slices';
  /** The block sums file (sums.ts) and its SHA-256; absent in points of repos made before it. */
  sums?: string;
  sumsSha256?: string;
  /** The sum of every CHUNK_SIZE chunk of the disk at this point, and over those (the disk's checksum); see sums.ts. */
  chunks: string[];
  diskSha256: string;
}

export interface Manifest {
  format: typeof FORMAT;
  version: 1;
  id: string;
  source: string;
  virtualSize: number;
  chunkSize: number;
  points: Point[];
}

export class Repo {
  private constructor(
    readonly dir: string,
    public manifest: Manifest,
    private readonly lockFd: number | null,
  ) {}

  get points(): Point[] {
    return this.manifest.points;
  }

  get last(): Point | null {
    return this.manifest.points[this.manifest.points.length - 1] ?? null;
  }

  point(id: string | undefined): Point {
    if (id === undefined) {
      const last = this.last;
      if (!last) throw new NbddError(Errno.ENOENT, `${this.dir}: the repo has no points yet`);
      return last;
    }
    const p = this.points.find((x) => x.id === id);
    if (!p) throw new NbddError(Errno.ENOENT, `${this.dir}: no point '${id}' (points: ${this.points.map((x) => x.id).join(', ') || 'none'})`);
    return p;
  }

  /** The points `p` reads through, from the full one up to `p`. */
  chainOf(p: Point): Point[] {
    const i = this.points.indexOf(p);
    let start = i;
    while (start > 0 && this.points[start]!.kind !== 'full') start--;
    return this.points.slice(start, i + 1);
  }

  /**
   * Every nonzero block's sum on the disk at point `p`, from the sums files of its chain (full
   * point first); null when a point has none (made before they were kept) or, unless `strict`
   * (verify), one is missing or does not match the manifest — then the caller reads the blocks
   * instead, which is slower but as exact. `strict` throws EUCLEAN naming the file.
   */
  async blockSumsAt(p: Point, strict = false): Promise<BlockSums | null> {
    const out: BlockSums = new Map();
    const count = Math.ceil(p.virtualSize / BLOCK_SIZE);
    for (const q of this.chainOf(p)) {
      if (!q.sums) return null;
      try {
        const data = await fsp.readFile(this.path(q.sums));
        if (createHash('sha256').update(data).digest('hex') !== q.sumsSha256) throw new Error('its SHA-256 is not the one the manifest records');
        decodeBlockSums(data, count, out);
      } catch (err) {
        if (strict) throw new NbddError(Errno.EUCLEAN, `point ${q.id}: its block sums file ${q.sums} is damaged: ${(err as Error).message}`);
        log.warn(`${this.path(q.sums)}: ${(err as Error).message}; reading the blocks instead`);
        return null;
      }
    }
    return out;
  }

  path(file: string): string {
    return join(this.dir, file);
  }

  /** The id the next point gets ("0001", "0002", …). */
  nextId(): string {
    const n = this.points.reduce((m, p) => Math.max(m, Number(p.id) || 0), 0) + 1;
    return String(n).padStart(4, '0');
  }

  /** Opens an existing repo read-only (backups, restore, verify). */
  static async open(dir: string): Promise<Repo> {
    return new Repo(dir, await readManifest(dir), null);
  }

  /**
   * Opens `dir` for a backup of `source` (size `virtualSize`), creating the repo if `dir` is
   * missing or empty, and locks it. Refuses a directory that holds something else, and a repo of
   * another disk.
   */
  static async openForBackup(dir: string, source: string, virtualSize: number): Promise<Repo> {
    const entries = await fsp.readdir(dir).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return null;
      throw new NbddError(Errno.EIO, `cannot read ${dir}: ${err.message}`);
    });
    let manifest: Manifest;
    if (entries === null || entries.length === 0) {
      await fsp.mkdir(dir, { recursive: true });
      manifest = { format: FORMAT, version: 1, id: randomUUID(), source, virtualSize, chunkSize: CHUNK_SIZE, points: [] };
    } else {
      manifest = await readManifest(dir);
      if (manifest.virtualSize !== virtualSize) {
        throw new NbddError(Errno.EINVAL, `${dir} is a repo of a ${manifest.virtualSize}-byte disk ('${manifest.source}'); '${source}' has ${virtualSize} bytes`);
      }
      if (manifest.source !== source) {
        throw new NbddError(Errno.EINVAL, `${dir} is a repo of '${manifest.source}', not of '${source}'`);
      }
    }
    const fd = openSync(join(dir, 'lock'), 'a');
    if (!tryFlock(fd, LOCK_EX)) {
      closeSync(fd);
      throw new NbddError(Errno.EBUSY, `${dir}: another backup is writing this repo`);
    }
    const repo = new Repo(dir, manifest, fd);
    if (manifest.points.length === 0) await repo.writeManifest();
    await repo.removePartials();
    return repo;
  }

  /** A partial file's name for point `id`. */
  partialFile(id: string): string {
    return `.partial-${id}.qcow2`;
  }

  private async removePartials(): Promise<void> {
    for (const f of await fsp.readdir(this.dir)) if (f.startsWith('.partial-')) await fsp.rm(join(this.dir, f), { force: true });
  }

  /**
   * Makes `point` (whose file is at `partial`) part of the repo with its block sums: both synced
   * and renamed into place, then the manifest.
   */
  async commit(point: Point, partial: string, sums: BlockSums): Promise<void> {
    const data = encodeBlockSums(sums);
    const sumsFile = `${point.id}.sums`;
    const sumsPartial = `.partial-${point.id}.sums`;
    await fsp.writeFile(this.path(sumsPartial), data);
    for (const f of [partial, sumsPartial]) {
      const fh = await fsp.open(this.path(f), 'r');
      try {
        await fh.datasync();
      } finally {
        await fh.close();
      }
    }
    await fsp.rename(this.path(partial), this.path(point.file));
    await fsp.rename(this.path(sumsPartial), this.path(sumsFile));
    point = { ...point, sums: sumsFile, sumsSha256: createHash('sha256').update(data).digest('hex') };
    this.manifest = { ...this.manifest, points: [...this.manifest.points, point] };
    await this.writeManifest();
  }

  private async writeManifest(): Promise<void> {
    const tmp = join(this.dir, `.${MANIFEST}.tmp`);
    const fh = await fsp.open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(`${JSON.stringify(this.manifest, null, 1)}\n`);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, join(this.dir, MANIFEST));
    const d = await fsp.open(this.dir, 'r');
    try {
      await d.sync();
    } finally {
      await d.close();
    }
  }

  close(): void {
    if (this.lockFd !== null) closeSync(this.lockFd);
  }
}

async function readManifest(dir: string): Promise<Manifest> {
  const text = await fsp.readFile(join(dir, MANIFEST), 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new NbddError(Errno.EINVAL, `${dir} is not an nbdd backup repo (no ${MANIFEST}); use an empty or new directory`);
    throw new NbddError(Errno.EIO, `cannot read ${join(dir, MANIFEST)}: ${err.message}`);
  });
  let m: Manifest;
  try {
    m = JSON.parse(text) as Manifest;
  } catch (err) {
    throw new NbddError(Errno.EINVAL, `${join(dir, MANIFEST)} is not valid JSON: ${(err as Error).message}`);
  }
  if (m?.format !== FORMAT || m.version !== 1 || !Array.isArray(m.points) || typeof m.virtualSize !== 'number' || m.chunkSize !== CHUNK_SIZE) {
    throw new NbddError(Errno.EINVAL, `${join(dir, MANIFEST)} is not an nbdd backup manifest (version 1)`);
  }
  return m;
}
