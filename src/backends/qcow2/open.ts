/**
 * Opening a qcow2 image and its backing chain: header and layout validation (nothing is written
 * until all of it passed), refcount loading for writable images, backing files resolved relative
 * to the image's directory and opened read-only, loops and excessive depth refused.
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { Errno, NbddError } from '../../core/errors.js';
import { isNbdUri } from '../../nbd/uri.js';
import type { FilePort } from '../../io/file-port.js';
import { openFilePort } from '../../io/open-port.js';
import { lockImage } from '../../io/image-lock.js';
import { DEFAULT_L2_CACHE_BYTES, Qcow2Image } from './image.js';
import type { ImageLayer } from './layer.js';
import {
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  checkL1,
  decodeRefcountTable,
  hasBackingName,
  type Geometry,
  type Qcow2Header,
} from './format/index.js';
import { RawLayer } from './raw-layer.js';
import { probeFormat } from '../probe.js';
import { readClusterZero } from './read-header.js';
import { corruptionsOf, scanImage, type ScanInput } from './check/scan.js';
import { checkQcow2 } from './check/index.js';
import { logger } from '../../core/log.js';
import { Refcounts } from './refcounts.js';

const log = logger('qcow2');

/** Longest backing chain followed (QEMU has no fixed limit; this stops pathological chains). */
export const MAX_CHAIN_DEPTH = 64;
/** Backing names that are protocols or JSON, not files: refused. */
const PROTOCOL_NAME = /^(json|nbd[+a-z]*|https?|ftps?|ssh|iscsi|rbd|gluster|file):/;

export interface OpenQcow2Options {
  readOnly: boolean;
  /** Open the backing chain (default true). Without it, unallocated clusters read as zeroes. */
  openBacking?: boolean;
  /** L2 cache budget per image in bytes (default 4 MiB). */
  l2CacheBytes?: number;
  /** Wraps the top image's file port (fault-injection and power-loss tests); not the backing files'. */
  wrapPort?: (port: FilePort) => FilePort;
  /**
   * Opens a backing file named by an NBD URI (src/backends/nbd-layer.ts). Without it such an
   * image is refused: a stranger's image must not make nbdd connect wherever it names and serve
   * what it reads there (another local export, a host behind the firewall).
   */
  openRemote?: (uri: string) => Promise<ImageLayer>;
}

/** The option that lets images follow NBD URI backing files (named in refusals). */
export const ALLOW_REMOTE_BACKING_OPTION = '--allow-remote-backing';

function corrupt(message: string): NbddError {
  return new NbddError(Errno.EUCLEAN, `corrupt qcow2 image: ${message}`);
}

/** Opens a qcow2 image (and, unless told not to, its backing chain). Throws NbddError. */
export function openQcow2(path: string, options: OpenQcow2Options): Promise<Qcow2Image> {
  return openInChain(path, options, []);
}

/** Refuses writable opens of images marked dirty or corrupt, naming the repair command. */
function checkWritable(path: string, h: Qcow2Header): void {
  if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
    throw new NbddError(Errno.EROFS, `${path}: image is marked corrupt; open it read-only or repair it with 'nbdd check --repair all ${path}'`);
  }
  if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
    throw new NbddError(Errno.EROFS, `${path}: image has the dirty bit set (lazy refcounts not written back); repair it with 'nbdd check --repair all ${path}' before opening it for writing`);
  }
  // (The top image of a writable open is repaired instead: see repairDirty.)
  if (h.nbSnapshots > 0) {
    throw new NbddError(Errno.EPERM, `${path}: image has ${h.nbSnapshots} internal snapshot(s); nbdd opens such images read-only`);
  }
}

/**
 * A writable open of an image with the dirty bit (lazy refcounts, not closed cleanly): `nbdd check
 * --repair all` first, as qemu repairs such an image when it opens it for writing. What the
 * repair cannot fix keeps the image refused.
 */
async function repairDirty(path: string): Promise<void> {
  log.warn(`${path} was not closed cleanly (dirty bit, lazy refcounts): rebuilding its refcounts before writing`);
  const r = await checkQcow2(path, { repair: 'all' });
  if (r.corruptions > 0) {
    throw new NbddError(Errno.EUCLEAN, `${path}: the dirty image still has ${r.corruptions} corruption(s) after its refcounts were rebuilt (${r.messages.find((m) => m.startsWith('ERROR')) ?? ''}); open it read-only`);
  }
}

/** Records which cluster holds which metadata, refusing overlaps. */
class MetadataMap {
  private readonly owner = new Map<number, string>();
  constructor(private readonly clusterSize: number) {}

  claim(offset: number, bytes: number, what: string): void {
    for (let c = offset / this.clusterSize; c < Math.ceil((offset + bytes) / this.clusterSize); c++) {
      const previous = this.owner.get(c);
      if (previous !== undefined) throw corrupt(`overlapping metadata: cluster 0x${(c * this.clusterSize).toString(16)} is both ${previous} and ${what}`);
      this.owner.set(c, what);
    }
  }

  clusters(): Set<number> {
    return new Set(this.owner.keys());
  }
}

/**
 * The reference scan a writable open runs before anything is written: an image with any
 * corruption is refused (it would be made worse: a cluster in use could be handed out again);
 * leaks are only noted. Returns every metadata cluster, for the overlap check of later writes.
 */
async function checkBeforeWriting(path: string, input: ScanInput): Promise<Set<number>> {
  const scan = await scanImage(input);
  const corruptions = corruptionsOf(scan);
  if (corruptions > 0) {
    const first = scan.messages.find((m) => m.startsWith('ERROR')) ?? '';
    throw new NbddError(
      Errno.EUCLEAN,
      `${path}: the image has ${corruptions} corruption(s) (${first.replace(/^ERROR:? /, '')}); it can be opened read-only, and 'nbdd check --repair all ${path}' repairs refcount damage`,
    );
  }
  if (scan.leaks > 0) log.info(`${path}: ${scan.leaks} leaked cluster(s) (wasted space only; 'nbdd check --repair leaks' reclaims them)`);
  return scan.refs.metadataClusters();
}

function checkInFile(offset: number, bytes: number, fileLength: number, what: string): void {
  if (offset + bytes > fileLength) throw corrupt(`${what} at 0x${offset.toString(16)} (${bytes} bytes) runs past the end of the file (${fileLength} bytes)`);
}

async function loadRefcounts(port: FilePort, h: Qcow2Header, g: Geometry, fileLength: number, meta: MetadataMap): Promise<Refcounts> {
  const tableBytes = h.refcountTableClusters * g.clusterSize;
  const raw = await port.readAt(Buffer.alloc(tableBytes), h.refcountTableOffset);
  const table = decodeRefcountTable(raw, g.clusterSize, fileLength);
  const blocks = new Map<number, Buffer>();
  await Promise.all(
    table.map(async (off, i) => {
      if (off === 0) return;
      meta.claim(off, g.clusterSize, `refcount block ${i}`);
      blocks.set(i, await port.readAt(Buffer.alloc(g.clusterSize), off));
    }),
  );
  return new Refcounts(g, h.refcountTableOffset, h.refcountTableClusters, table, blocks, fileLength);
}

async function openBackingLayer(imagePath: string, name: string, format: string | undefined, options: OpenQcow2Options, chain: string[]): Promise<ImageLayer> {
  if (isNbdUri(name)) {
    if (format !== undefined && format !== 'raw') throw new NbddError(Errno.ENOTSUP, `${imagePath}: backing file '${name}' has format '${format}'; an NBD export is a raw layer (create the overlay with -F raw)`);
    if (!options.openRemote) {
      throw new NbddError(Errno.EPERM, `${imagePath}: backing file '${name}' is on an NBD server; nbdd connects to one named by an image only with ${ALLOW_REMOTE_BACKING_OPTION} (an image from elsewhere could name any host or local socket)`);
    }
    return options.openRemote(name);
  }
  if (PROTOCOL_NAME.test(name)) throw new NbddError(Errno.ENOTSUP, `${imagePath}: backing file '${name}' is not a plain file name or an NBD URI`);
  const path = isAbsolute(name) ? name : resolve(dirname(imagePath), name);
  const fmt = format ?? (await probeFormat(path));
  if (fmt === 'qcow2') return openInChain(path, { ...options, readOnly: true, wrapPort: undefined }, chain);
  if (fmt === 'raw') return RawLayer.open(path);
  throw new NbddError(Errno.ENOTSUP, `${imagePath}: backing file format '${fmt}' is not supported (qcow2 or raw)`);
}

async function openInChain(path: string, options: OpenQcow2Options, chain: string[]): Promise<Qcow2Image> {
  const real = await realpath(path).catch((err: NodeJS.ErrnoException) => {
    throw new NbddError(err.code === 'ENOENT' ? Errno.ENOENT : Errno.EIO, `cannot open ${path}: ${err.message}`);
  });
  if (chain.includes(real)) throw new NbddError(Errno.ELOOP, `backing chain loop: ${[...chain, real].join(' -> ')}`);
  if (chain.length >= MAX_CHAIN_DEPTH) throw new NbddError(Errno.ELOOP, `backing chain deeper than ${MAX_CHAIN_DEPTH} at ${path}`);
  const opened = await openFilePort(path, { readOnly: options.readOnly });
  const port = options.wrapPort ? options.wrapPort(opened) : opened;
  let backing: ImageLayer | null = null;
  try {
    // As the raw backend: one writer or several readers per image among nbdd processes.
    lockImage(port.fd, path, options.readOnly ? 'read' : 'write');
    const fileLength = await port.length();
    const { header, geometry: g, extensions, cluster0 } = await readClusterZero(port, fileLength);
    if (!options.readOnly && chain.length === 0 && (header.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) === INCOMPAT_DIRTY) {
      // As qemu on a writable open: the refcounts a lazy-refcounts writer left behind are rebuilt.
      await port.close();
      await repairDirty(path);
      return openInChain(path, options, chain);
    }
    if (!options.readOnly) checkWritable(path, header);

    const meta = new MetadataMap(g.clusterSize);
    meta.claim(0, g.clusterSize, 'the header');
    const l1Bytes = header.l1Size * 8;
    checkInFile(header.l1TableOffset, l1Bytes, fileLength, 'L1 table');
    meta.claim(header.l1TableOffset, l1Bytes, 'the L1 table');
    checkInFile(header.refcountTableOffset, header.refcountTableClusters * g.clusterSize, fileLength, 'refcount table');
    meta.claim(header.refcountTableOffset, header.refcountTableClusters * g.clusterSize, 'the refcount table');
    const l1 = await port.readAt(Buffer.alloc(l1Bytes), header.l1TableOffset);
    checkL1(l1, g.clusterSize, fileLength).forEach((off) => meta.claim(off, g.clusterSize, `an L2 table`));
    const refcounts = options.readOnly ? null : await loadRefcounts(port, header, g, fileLength, meta);
    const metadataClusters = meta.clusters();
    if (!options.readOnly) {
      // Nothing is written to an image that has not passed the full check (check/scan.ts).
      for (const c of await checkBeforeWriting(path, { port, header, extensions, geometry: g, fileLength })) metadataClusters.add(c);
    }

    const nameBytes = hasBackingName(header) ? cluster0.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize) : null;
    if (nameBytes?.includes(0)) throw corrupt(`backing file name (backing_file_offset ${header.backingFileOffset}, ${header.backingFileSize} bytes) contains a NUL byte`);
    const backingName = nameBytes ? nameBytes.toString('utf8') : null;
    if (backingName !== null && options.openBacking !== false) {
      backing = await openBackingLayer(path, backingName, extensions.backingFormat, options, [...chain, real]);
    }
    const image = new Qcow2Image({
      path,
      port,
      header,
      extensions,
      geometry: g,
      l1,
      refcounts,
      metadataClusters,
      fileLength,
      backing,
      backingName,
      l2CacheBytes: options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES,
    });
    return image;
  } catch (err) {
    await port.close();
    await backing?.close();
    throw err;
  }
}
