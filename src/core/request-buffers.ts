/**
 * Recycled buffers for request data: READ results (the raw and qcow2 backends and the NBD client
 * take their destination here) go back when the NBD server has written the reply carrying them to
 * the client socket; WRITE payloads (the NBD server takes them here) go back when the write
 * completed. A fresh ArrayBuffer per request otherwise costs a malloc, a V8 backing store and its
 * sweeping — for 4 KiB reads, a tenth of the server's CPU (perf, 4k randread) — and for 1 MiB
 * ones a full mark-compact every dozen MiB (external memory counts against a small heap's GC
 * limit), and the process's peak memory grows with the garbage it has not collected yet.
 *
 * Only buffers this pool handed out, whole (not views of them), are taken back, and only up to
 * FREE_BYTES_MAX idle bytes; everything else is left to the GC. Whoever gives a buffer back
 * promises nothing else still uses it (a READ's buffer belongs to its caller); whatever holds a
 * buffer past its request calls `keep` first, so a later give cannot recycle it under the holder.
 */
/**
 * Lengths pooled: between these, inclusive. Shorter ones come from Node's own shared pool
 * (`Buffer.allocUnsafe` below 4 KiB), which costs no allocation of their own.
 */
export const POOL_MIN = 4 * 1024;
const POOL_MAX = 4 * 1024 * 1024;
/** Most idle bytes kept over all lengths. */
const FREE_BYTES_MAX = 16 * 1024 * 1024;

export class RequestBuffers {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;
  /** Buffers handed out and not yet given back. */
  private readonly lent = new WeakSet<Buffer>();

  constructor(private readonly freeBytesMax = FREE_BYTES_MAX) {}

  /** A buffer of `length` bytes with unspecified contents, owned by the caller. */
  take(length: number): Buffer {
    if (length < POOL_MIN || length > POOL_MAX) return Buffer.allocUnsafe(length);
    const list = this.free.get(length);
    let buf = list?.pop();
    if (buf) {
      this.freeBytes -= length;
      // No empty list stays behind: a client asking every length once leaves no map behind.
      if (list!.length === 0) this.free.delete(length);
    } else buf = Buffer.allocUnsafeSlow(length);
    this.lent.add(buf);
    return buf;
  }

  /** `buf` is no longer used by anyone; kept for reuse when it came from `take`. */
  give(buf: Buffer): void {
    if (!this.lent.has(buf)) return;
    this.lent.delete(buf);
    if (this.freeBytes + buf.length > this.freeBytesMax) return;
    let list = this.free.get(buf.length);
    if (!list) this.free.set(buf.length, (list = []));
    list.push(buf);
    this.freeBytes += buf.length;
  }

  /**
   * `buf` is kept beyond its request (copy-before-write's scratch copies): it must never be
   * recycled, even if a READ that returns it later is given back. Whatever holds a READ result
   * or a WRITE payload past its request must call this.
   */
  keep(buf: Buffer): void {
    this.lent.delete(buf);
  }

  /** Idle bytes held for reuse. */
  get idleBytes(): number {
    return this.freeBytes;
  }
}

/** The process's pool. */
export const requestBuffers = new RequestBuffers();
