/**
 * The reference count a check builds from what the image references (qemu's "in-memory refcount
 * table", block/qcow2-refcount.c `qcow2_inc_refcounts_imrt`), plus what each cluster is used as,
 * so a cluster used as two things (an L2 table that is also data, a compressed cluster at the
 * header) is reported even where the counts happen to agree.
 *
 * Counts grow with the highest cluster referenced; a region may end past the file by less than a
 * cluster (the last cluster of a file may be partly written), further is an error, as in qemu.
 */
import { hex } from '../format/index.js';

/** What a cluster is referenced as. Metadata roles may not share a cluster with anything. */
export const Role = {
  free: 0,
  header: 1,
  l1: 2,
  l2: 3,
  refcountTable: 4,
  refcountBlock: 5,
  bitmapDirectory: 6,
  bitmapTable: 7,
  bitmapData: 8,
  snapshotTable: 9,
  snapshotL1: 10,
  data: 11,
  compressed: 12,
} as const;
export type Role = (typeof Role)[keyof typeof Role];

const ROLE_NAMES = ['free', 'the header', 'the L1 table', 'an L2 table', 'the refcount table', 'a refcount block', 'the bitmap directory', 'a bitmap table', 'a bitmap data cluster', 'the snapshot table', 'a snapshot L1 table', 'a data cluster', 'a compressed cluster'];

export function roleName(role: Role): string {
  return ROLE_NAMES[role]!;
}

/** Roles one cluster may hold more than once (snapshots share L2 tables and data; compressed clusters pack). */
function mayShare(a: Role, b: Role): boolean {
  if (a === b) return a === Role.l2 || a === Role.data || a === Role.compressed;
  return (a === Role.data && b === Role.compressed) || (a === Role.compressed && b === Role.data);
}

export function isMetadata(role: Role): boolean {
  return role !== Role.free && role !== Role.data && role !== Role.compressed;
}

export class References {
  counts: Uint32Array;
  roles: Uint8Array;
  /** Corruptions found while counting (regions past the end, clusters used as two things). */
  readonly problems: string[] = [];

  /** The file's length as qemu measures it (whole 512-byte sectors). */
  private readonly fileLength: number;

  constructor(
    private readonly clusterSize: number,
    fileLength: number,
  ) {
    this.fileLength = Math.ceil(fileLength / 512) * 512;
    const n = Math.ceil(fileLength / clusterSize) + 1;
    this.counts = new Uint32Array(n);
    this.roles = new Uint8Array(n);
  }

  get length(): number {
    return this.counts.length;
  }

  count(cluster: number): number {
    return cluster < this.counts.length ? this.counts[cluster]! : 0;
  }

  role(cluster: number): Role {
    return (cluster < this.roles.length ? this.roles[cluster]! : Role.free) as Role;
  }

  /**
   * Counts one reference to every cluster of `[offset, offset + bytes)` as `role`; `what` names
   * the referrer in messages (a function, so the common case builds no string). False when the region was refused (it reaches a cluster or more
   * past the end of the file), so the caller does not read it.
   */
  add(offset: number, bytes: number, role: Role, what: string | (() => string)): boolean {
    const name = (): string => (typeof what === 'string' ? what : what());
    if (bytes <= 0) return true;
    const cs = this.clusterSize;
    if (offset + bytes - this.fileLength >= cs) {
      this.problems.push(`${name()}: region ${hex(offset)}+${hex(bytes)} reaches past the end of the file (${this.fileLength} bytes) by a cluster or more`);
      return false;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + bytes - 1) / cs);
    this.ensure(last + 1);
    for (let c = first; c <= last; c++) {
      const had = this.roles[c]! as Role;
      if (had !== Role.free && !mayShare(had, role)) {
        this.problems.push(`cluster ${hex(c * cs)} is both ${roleName(had)} and ${roleName(role)} (${name()})`);
      }
      if (had === Role.free || isMetadata(role)) this.roles[c] = role;
      this.counts[c] = this.counts[c]! + 1;
    }
    return true;
  }

  /**
   * `add` for one whole cluster at `offset`, without building a name unless there is a problem:
   * returns false when refused, and the problem (if any) names `whatOf()`.
   */
  addCluster(offset: number, role: Role, whatOf: () => string): boolean {
    const c = offset / this.clusterSize;
    if (offset + this.clusterSize - this.fileLength >= this.clusterSize || c + 1 > this.counts.length || this.roles[c] !== Role.free) return this.add(offset, this.clusterSize, role, whatOf);
    this.roles[c] = role;
    this.counts[c] = 1;
    return true;
  }

  /** Cluster indices referenced as metadata (the overlap check's set for a writable image). */
  metadataClusters(): Set<number> {
    const out = new Set<number>();
    for (let c = 0; c < this.roles.length; c++) if (isMetadata(this.roles[c]! as Role)) out.add(c);
    return out;
  }

  private ensure(n: number): void {
    if (n <= this.counts.length) return;
    const size = Math.max(n, this.counts.length * 2);
    const counts = new Uint32Array(size);
    counts.set(this.counts);
    const roles = new Uint8Array(size);
    roles.set(this.roles);
    this.counts = counts;
    this.roles = roles;
  }
}
