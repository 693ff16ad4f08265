/**
 * The image's side of persistent dirty bitmaps: what the in-image bitmap store
 * (src/bitmaps/store-qcow2.ts) needs from a writable v3 image — cluster allocation and freeing
 * with the image's own refcounts, a durable metadata commit, and a rewrite of the header
 * extension area with the bitmaps extension — plus the autoclear bit handling at writable open
 * and the directory as `nbdd info` shows it.
 */
import { Errno, NbddError } from '../../core/errors.js';
import { logger } from '../../core/log.js';
import type { Qcow2BitmapHost, Qcow2BitmapSource } from '../../bitmaps/store-qcow2.js';
import type { Allocator } from './allocator.js';
import type { Committer } from './commit.js';
import {
  AUTOCLEAR_BITMAPS,
  corrupt,
  decodeBitmapDirectory,
  featureField,
  HEADER,
  hex,
  MAX_DIRECTORY_BYTES,
  SUPPORTED_AUTOCLEAR,
  u64,
  withBitmapsExtension,
  type BitmapDirectoryEntry,
  type BitmapsExtension,
} from './format/index.js';
import type { ImageState } from './state.js';

const log = logger('qcow2');

/**
 * Prepares a writable image for its first write: clears the autoclear bits nbdd does not maintain
 * (the bitmaps bit included, as the spec requires of a program without bitmap support; the bitmaps
 * extension itself stays, readable through `extensions.bitmaps`) and makes that durable before
 * any other write. The open path has already refused dirty, corrupt, snapshot and damaged images.
 */
export async function prepareForWriting(st: ImageState): Promise<void> {
  const h = st.header;
  const clear = h.autoclearFeatures & ~SUPPORTED_AUTOCLEAR;
  if (clear === 0n) return;
  // The in-image bitmap store sets it again once it has taken the bitmaps over; without one they
  // stay inconsistent, as the spec requires.
  if ((clear & AUTOCLEAR_BITMAPS) !== 0n) log.debug(`${st.path}: clearing the bitmaps autoclear bit until the bitmaps are taken over`);
  h.autoclearFeatures &= SUPPORTED_AUTOCLEAR;
  await st.port.writeAt(featureField(h.autoclearFeatures), HEADER.autoclearFeatures);
  await st.port.fsync();
}

/** Where the stored bitmaps are read from; null for v2 images (no autoclear field to trust). */
export function bitmapSource(st: ImageState): Qcow2BitmapSource | null {
  if (!st.v3) return null;
  return {
    path: st.path,
    port: st.port,
    clusterSize: st.cs,
    diskSize: st.size,
    bitmapsExtension: st.extensions.bitmaps ?? null,
    bitmapsConsistentAtOpen: st.bitmapsConsistentAtOpen,
  };
}

/** The host for the bitmap store; null for read-only and v2 images. */
export function bitmapHost(st: ImageState, alloc: Allocator, committer: Committer, beforeWrite: () => Promise<void>): Qcow2BitmapHost | null {
  const source = bitmapSource(st);
  if (!st.refs || !source) return null;
  return {
    ...source,
    allocateClusters: (n) => alloc.contiguous(n),
    freeClusters: (offset, n) => {
      for (let k = 0; k < n; k++) st.pendingFrees.push(offset / st.cs + k);
    },
    commitMetadata: async () => {
      await beforeWrite();
      await committer.commit();
      await st.port.fsync();
    },
    // In the commit chain: a commit may be rewriting header fields meanwhile.
    writeBitmapsExtension: async (ext) => {
      await beforeWrite();
      await committer.inChain(() => writeBitmapsExtension(st, ext), false);
    },
  };
}

/**
 * Rewrites the header extension area with `ext` as the bitmaps extension (none when null),
 * keeping every other extension's bytes and the backing file name, and sets the bitmaps
 * autoclear bit exactly when `ext` is given. Durable when it resolves.
 */
async function writeBitmapsExtension(st: ImageState, ext: BitmapsExtension | null): Promise<void> {
  const h = st.header;
  const cluster0 = await st.port.readAt(Buffer.alloc(st.cs), 0);
  const area = withBitmapsExtension(cluster0, h, ext);
  if (!area) throw new NbddError(Errno.ENOSPC, `${st.path}: no room in the first cluster for the bitmaps extension`);
  const autoclear = ext ? h.autoclearFeatures | AUTOCLEAR_BITMAPS : h.autoclearFeatures & ~AUTOCLEAR_BITMAPS;
  await st.port.writeAt(area.bytes, h.headerLength);
  await st.port.writeAt(u64(area.backingFileOffset), HEADER.backingFileOffset);
  await st.port.writeAt(featureField(autoclear), HEADER.autoclearFeatures);
  await st.port.fsync();
  h.backingFileOffset = area.backingFileOffset;
  h.autoclearFeatures = autoclear;
  if (ext) st.extensions.bitmaps = { ...ext };
  else delete st.extensions.bitmaps;
}

/** The bitmap directory named by the bitmaps extension (empty without one), as stored. */
export async function readBitmapDirectory(st: ImageState): Promise<BitmapDirectoryEntry[]> {
  const ext = st.extensions.bitmaps;
  if (!ext) return [];
  if (ext.directorySize > MAX_DIRECTORY_BYTES) throw corrupt(`bitmap directory of ${ext.directorySize} bytes exceeds ${MAX_DIRECTORY_BYTES}`);
  if (ext.directoryOffset % st.cs !== 0 || ext.directoryOffset + ext.directorySize > st.fileLength) {
    throw corrupt(`bitmap directory at ${hex(ext.directoryOffset)} is unaligned or past the end of the file`);
  }
  const dir = await st.port.readAt(Buffer.alloc(ext.directorySize), ext.directoryOffset);
  return decodeBitmapDirectory(dir, ext.nbBitmaps);
}
