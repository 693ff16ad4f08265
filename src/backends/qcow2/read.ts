/**
 * Reads: the mapping walk (mapping.ts) merged into runs, so contiguous host ranges become one file
 * read and contiguous backing ranges one backing read; zero ranges are filled, compressed clusters
 * inflated. Also the reads copy-on-write needs.
 */
import { decompressCluster } from './compress.js';
import { corrupt, decodeCompressed, hex } from './format/index.js';
import type { L2Tables } from './l2-tables.js';
import { MAP_BACKING, MAP_COMPRESSED, MAP_DATA, MAP_ZERO, walkMapping } from './mapping.js';
import type { ImageState } from './state.js';
import { Errno, NbddError } from '../../core/errors.js';

const RUN_NONE = 0;

export class Reader {
  constructor(
    private readonly st: ImageState,
    private readonly tables: L2Tables,
  ) {}

  /** Fills `buf` from guest `offset`. The caller holds the range lock. */
  async readLocked(buf: Buffer, offset: number): Promise<void> {
    const jobs: Promise<unknown>[] = [];
    let kind = RUN_NONE;
    let runAt = 0; // position in buf
    let runLen = 0;
    let runAddr = 0; // host offset (data) or guest offset (backing)
    const flushRun = (): void => {
      if (kind === MAP_DATA) jobs.push(this.st.port.readAt(buf.subarray(runAt, runAt + runLen), runAddr));
      else if (kind === MAP_ZERO) buf.fill(0, runAt, runAt + runLen);
      else if (kind === MAP_BACKING) {
        // Without a backing file there (none, or past its end) the run reads as zeroes: no job.
        const backing = this.st.backing;
        if (backing && runAddr < backing.size) jobs.push(this.readBacking(buf.subarray(runAt, runAt + runLen), runAddr));
        else buf.fill(0, runAt, runAt + runLen);
      }
      kind = RUN_NONE;
    };
    try {
      await walkMapping(this.st, this.tables, offset, offset + buf.length, (k, guest, len, host, hi, lo) => {
        const at = guest - offset;
        if (k === MAP_COMPRESSED) {
          flushRun();
          const clusterStart = Math.floor(guest / this.st.cs) * this.st.cs;
          jobs.push(this.readCompressed(hi, lo, buf.subarray(at, at + len), guest - clusterStart));
          return;
        }
        const addr = k === MAP_DATA ? host : guest;
        if (k === kind && runAt + runLen === at && (k === MAP_ZERO || runAddr + runLen === addr)) {
          runLen += len;
          return;
        }
        flushRun();
        kind = k;
        runAt = at;
        runLen = len;
        runAddr = addr;
      });
      flushRun();
    } catch (err) {
      await Promise.allSettled(jobs);
      throw err;
    }
    if (jobs.length === 1) await jobs[0];
    else if (jobs.length > 1) await Promise.all(jobs);
  }

  /**
   * Moves guest [offset, offset + length) into a pipe by reference (`splice(pipeFd, host, length)`,
   * the port's) when it is one run of data clusters, contiguous in the file. Anything else — zero,
   * unallocated, backing or compressed clusters, data in two places — rejects with ENOTSUP before
   * the pipe is touched: the caller reads into a buffer. The caller holds the range lock.
   */
  async spliceLocked(offset: number, length: number, splice: (host: number, length: number) => Promise<void>): Promise<void> {
    let host = -1;
    let covered = 0;
    await walkMapping(this.st, this.tables, offset, offset + length, (k, guest, len, at) => {
      if (covered < 0) return;
      if (k !== MAP_DATA || guest !== offset + covered || (covered > 0 && at !== host + covered)) covered = -1;
      else {
        if (covered === 0) host = at;
        covered += len;
      }
    });
    if (covered !== length) throw new NbddError(Errno.ENOTSUP, 'not one run of data clusters');
    await splice(host, length);
  }

  /** Reads guest bytes for copy-on-write; parts past the virtual size read as zeroes. */
  async readForCow(guestOffset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    const n = Math.max(0, Math.min(length, this.st.size - guestOffset));
    if (n > 0) await this.readLocked(buf.subarray(0, n), guestOffset);
    return buf;
  }

  /** Reads guest bytes the backing chain supplies; past the backing file's end they are zeroes. */
  private async readBacking(buf: Buffer, offset: number): Promise<void> {
    const backing = this.st.backing;
    const inBacking = backing ? Math.max(0, Math.min(buf.length, backing.size - offset)) : 0;
    if (inBacking > 0) await backing!.readInto(buf.subarray(0, inBacking), offset);
    if (inBacking < buf.length) buf.fill(0, inBacking);
  }

  private async readCompressed(hi: number, lo: number, target: Buffer, inCluster: number): Promise<void> {
    const st = this.st;
    const { offset, length } = decodeCompressed(hi, lo, st.g.clusterBits);
    if (offset >= st.fileLength) throw corrupt(`compressed cluster at ${hex(offset)} lies past the end of the file`);
    const src = await st.port.readAt(Buffer.allocUnsafe(length), offset);
    const cluster = await decompressCluster(st.header.compressionType, src, st.cs);
    cluster.copy(target, 0, inCluster, inCluster + target.length);
  }
}
