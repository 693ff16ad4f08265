/**
 * Reading a qcow2 file's cluster 0, the header and its extensions, for opening and for `check`.
 * The first read is 64 KiB (a whole cluster at qemu-img's default size); only a header naming a
 * larger cluster is read again at its size. Reading the largest possible cluster (2 MiB) every
 * time left that much of the file in memory for the life of the open image, until a collection.
 */
import type { FilePort } from '../../io/file-port.js';
import {
  HEADER,
  MAX_CLUSTER_BITS,
  checkFeatures,
  decodeExtensions,
  decodeHeader,
  geometryOf,
  type Geometry,
  type HeaderExtensions,
  type Qcow2Header,
} from './format/index.js';

const FIRST_READ_BITS = 16;

export interface ClusterZero {
  header: Qcow2Header;
  geometry: Geometry;
  extensions: HeaderExtensions;
  /** The bytes of cluster 0 (fewer when the file is shorter): where the backing file name is. */
  cluster0: Buffer;
}

/** Reads and validates cluster 0 of the qcow2 file behind `port` (`fileLength` bytes long). */
export async function readClusterZero(port: FilePort, fileLength: number): Promise<ClusterZero> {
  let start = await port.readAt(Buffer.alloc(Math.min(fileLength, 2 ** FIRST_READ_BITS)), 0);
  // An out-of-range cluster_bits is decodeHeader's to report, with the rest of the header.
  const bits = start.length >= HEADER.clusterBits + 4 ? start.readUInt32BE(HEADER.clusterBits) : 0;
  if (bits > FIRST_READ_BITS && bits <= MAX_CLUSTER_BITS && fileLength > start.length) {
    start = await port.readAt(Buffer.alloc(Math.min(fileLength, 2 ** bits)), 0);
  }
  const header = decodeHeader(start);
  const geometry = geometryOf(header);
  const cluster0 = start.subarray(0, Math.min(start.length, geometry.clusterSize));
  const extensions = decodeExtensions(cluster0, header);
  checkFeatures(header, extensions);
  return { header, geometry, extensions, cluster0 };
}
