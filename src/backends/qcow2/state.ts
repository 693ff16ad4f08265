/**
 * What every part of the qcow2 engine shares about one open image: the file, the header and its
 * geometry, the L1 table and refcounts in memory, and the few counters the crash-safe order
 * needs. The parts (tables, allocator, read, write, discard, commit, bitmap host) each hold this
 * and change it only in synchronous code, so two requests of one batch never interleave there.
 */
import { Errno, NbddError, messageOf } from '../../core/errors.js';
import type { FilePort } from '../../io/file-port.js';
import { AUTOCLEAR_BITMAPS, corrupt, featureField, HEADER, INCOMPAT_CORRUPT, decodeCompressed, entryOffset, ENTRY_COPIED_HI, ENTRY_ZERO_LO, hex, L2_RESERVED_HI, L2_RESERVED_LO, type Geometry, type HeaderExtensions, type Qcow2Header } from './format/index.js';
import type { ImageLayer } from './layer.js';
import type { Refcounts } from './refcounts.js';
import { logger } from '../../core/log.js';

const log = logger('qcow2');

/** What open hands the engine (see open.ts). */
export interface Qcow2Parts {
  path: string;
  port: FilePort;
  header: Qcow2Header;
  extensions: HeaderExtensions;
  geometry: Geometry;
  l1: Buffer;
  /** Loaded for writable images only. */
  refcounts: Refcounts | null;
  /** Cluster indices holding fixed metadata (header, L1, refcount table and blocks, L2 tables). */
  metadataClusters: Set<number>;
  fileLength: number;
  backing: ImageLayer | null;
  backingName: string | null;
  l2CacheBytes: number;
}

export class ImageState {
  readonly path: string;
  readonly port: FilePort;
  readonly header: Qcow2Header;
  readonly extensions: HeaderExtensions;
  readonly g: Geometry;
  /** Cluster size. */
  readonly cs: number;
  readonly v3: boolean;
  /** Virtual size. */
  readonly size: number;
  readonly l1: Buffer;
  /** Null on a read-only open. */
  readonly refs: Refcounts | null;
  readonly metadataClusters: Set<number>;
  readonly backing: ImageLayer | null;
  fileLength: number;
  readonly openLength: number;
  /** Data or entries written since the last fdatasync. */
  unsyncedData = false;
  /** Host clusters released by requests whose entries are in the file: a commit frees them. */
  pendingFrees: number[] = [];
  /** The first metadata write that failed: memory and file may disagree, so writes stop. */
  commitError: unknown = null;
  /** Set when close begins. */
  closed = false;
  /** Autoclear bit 0 as found at open, before `prepareForWriting` cleared it. */
  readonly bitmapsConsistentAtOpen: boolean;

  constructor(parts: Qcow2Parts) {
    this.path = parts.path;
    this.port = parts.port;
    this.header = parts.header;
    this.extensions = parts.extensions;
    this.g = parts.geometry;
    this.cs = parts.geometry.clusterSize;
    this.v3 = parts.header.version === 3;
    this.size = parts.header.size;
    this.l1 = parts.l1;
    this.refs = parts.refcounts;
    this.metadataClusters = parts.metadataClusters;
    this.backing = parts.backing;
    this.fileLength = this.openLength = parts.fileLength;
    this.bitmapsConsistentAtOpen = (parts.header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  }

  /** The header write marking the image corrupt, once an overlap check failed (close waits for it). */
  marking: Promise<void> | null = null;

  /** Whether host cluster `c` holds live metadata (header, L1, L2, refcounts, bitmaps, snapshots). */
  isMetadata(c: number): boolean {
    return this.metadataClusters.has(c) || (this.refs?.isStructure(c) ?? false);
  }

  /**
   * The overlap check failed: host cluster `c` was about to be written (`what`) but holds live
   * metadata. As qemu does, the image is marked corrupt in its header (it then opens for writing
   * only after \`nbdd check --repair all\`), takes no more writes, and the request fails with EIO
   * before anything of it is written. Returns the error to throw.
   */
  overlap(c: number, what: string): NbddError {
    const err = new NbddError(Errno.EIO, `${this.path}: metadata overlap check failed: ${what} would overwrite metadata cluster ${hex(c * this.cs)}; the image is marked corrupt and takes no more writes`);
    if (this.marking) return err;
    this.commitError ??= err;
    log.error(err.message);
    if (this.v3) {
      this.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
      this.marking = this.port
        .writeAt(featureField(this.header.incompatibleFeatures), HEADER.incompatibleFeatures)
        .then(() => this.port.fsync())
        .catch((e) => log.error(`${this.path}: marking the image corrupt failed: ${messageOf(e)}`));
    } else {
      this.marking = Promise.resolve();
    }
    return err;
  }

  /** Records the first metadata failure; the EIO to throw for it. */
  failed(what: string, err: unknown): NbddError {
    this.commitError ??= err;
    return new NbddError(Errno.EIO, `${this.path}: ${what} failed: ${messageOf(err)}`);
  }

  assertWritable(): void {
    if (!this.refs) throw new NbddError(Errno.EROFS, `${this.path} is open read-only`);
    if (this.commitError) throw new NbddError(Errno.EIO, `${this.path}: an earlier metadata commit failed: ${messageOf(this.commitError)}`);
  }

  /** The L2 table offset L1 entry `l1i` names (0: none). */
  l1Offset(l1i: number): number {
    return entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4));
  }

  /**
   * Validates a data cluster offset read from an L2 entry. With subclusters the file may end inside
   * the last data cluster, so only its start must lie inside the file.
   */
  checkDataHost(host: number, ci: number): void {
    if (host % this.cs !== 0) throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} has unaligned host offset ${hex(host)}`);
    if (host >= Math.max(this.fileLength, this.refs?.hostEnd ?? 0)) {
      throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} points at ${hex(host)}, past the end of the file (${this.fileLength} bytes)`);
    }
  }

  /**
   * Validates the flag bits of a standard L2 entry when it is used: reserved bits clear, and no
   * zero flag on v2. A damaged entry fails the request with
   * EIO rather than being read as zeroes or garbage.
   */
  checkEntryBits(hi: number, lo: number, ci: number): void {
    if ((hi & L2_RESERVED_HI) !== 0 || (lo & L2_RESERVED_LO) !== 0) {
      throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} has reserved bits set (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')})`);
    }
    // With extended L2 the bit is ignored, as qemu does: the subcluster bitmaps say what is zero.
    if ((lo & ENTRY_ZERO_LO) !== 0 && !this.v3) throw corrupt(`L2 entry of guest offset ${hex(ci * this.cs)} has the zero flag set, which version 2 images do not have`);
  }

  /**
   * Validates a compressed descriptor when it is used: no COPIED flag, and its sectors end less
   * than a cluster past the end of the file (qemu's rule: the last cluster may be partly written).
   */
  checkCompressed(hi: number, lo: number, ci: number): void {
    if ((hi & ENTRY_COPIED_HI) !== 0) throw corrupt(`compressed L2 entry of guest offset ${hex(ci * this.cs)} has the COPIED flag set`);
    const { offset, length } = decodeCompressed(hi, lo, this.g.clusterBits);
    if (offset < this.cs || offset + length - Math.max(this.fileLength, this.refs?.hostEnd ?? 0) >= this.cs) {
      throw corrupt(`compressed L2 entry of guest offset ${hex(ci * this.cs)} names ${hex(offset)}+${length} bytes, outside the file (${this.fileLength} bytes)`);
    }
  }

  /** The entry's host cluster is ours alone (COPIED, or a refcount of 1). */
  isExclusive(hi: number, host: number): boolean {
    return (hi & ENTRY_COPIED_HI) !== 0 || this.refs!.get(host / this.cs) === 1;
  }

  /** Host cluster indices a compressed descriptor occupies (each holds one reference). */
  compressedClusters(hi: number, lo: number): number[] {
    const { offset, length } = decodeCompressed(hi, lo, this.g.clusterBits);
    const out: number[] = [];
    for (let c = Math.floor(offset / this.cs); c <= Math.floor((offset + length - 1) / this.cs); c++) out.push(c);
    return out;
  }
}
