/**
 * Incremental byte reader over a list of received chunks (no concatenation of payloads).
 *
 * A protocol state machine pushes every socket chunk in and asks for exactly the bytes its state
 * needs. `consume(n)` returns a view into a received chunk when the bytes lie in one chunk (the
 * common case), and a copy only when they straddle chunks.
 *
 * Ownership: views returned by `consume` alias the pushed chunks; Node never reuses the Buffers it
 * hands to 'data' listeners, so views stay valid for as long as the caller keeps them. Whoever
 * pushes chunks it wants to write again (a `ReadSlab`) checks `lent`: it counts the views handed
 * out, so bytes consumed while it did not move were only copied (`consumeInto`), skipped or
 * decoded on the spot (`decode`).
 */
const EMPTY = Buffer.alloc(0);

export class ChunkReader {
  private chunks: Buffer[] = [];
  /** Index of the first live chunk in `chunks`. */
  private first = 0;
  /** Bytes already consumed from `chunks[first]`. */
  private offset = 0;
  private total = 0;
  /** Views of pushed chunks handed out by `consume` so far. */
  lent = 0;

  /** Bytes buffered and not yet consumed. */
  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Takes `n` bytes (`n <= length`). A view when possible, else a fresh copy. */
  consume(n: number): Buffer {
    if (n > this.total) throw new RangeError(`consume(${n}) with ${this.total} bytes buffered`);
    if (n === 0) return EMPTY;
    this.total -= n;
    const head = this.chunks[this.first]!;
    const avail = head.length - this.offset;
    if (n <= avail) {
      const view = head.subarray(this.offset, this.offset + n);
      this.advance(n, avail);
      this.lent++;
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    while (copied < n) {
      const chunk = this.chunks[this.first]!;
      const take = Math.min(chunk.length - this.offset, n - copied);
      chunk.copy(out, copied, this.offset, this.offset + take);
      copied += take;
      this.advance(take, chunk.length - this.offset);
    }
    return out;
  }

  /**
   * Takes `n` bytes (`n <= length`) and returns what `read` makes of them; the bytes are valid
   * only during the call (`read` must not keep them), so they count as copied, not lent.
   */
  decode<T>(n: number, read: (bytes: Buffer) => T): T {
    const lent = this.lent;
    const bytes = this.consume(n);
    this.lent = lent;
    return read(bytes);
  }

  /**
   * Copies up to `n` buffered bytes into `target` at `targetOffset` and consumes them; returns how
   * many were copied (`min(n, length)`). For payloads that land in a caller's buffer (a client's
   * READ data) without an intermediate copy.
   */
  consumeInto(target: Buffer, targetOffset: number, n: number): number {
    const count = Math.min(n, this.total);
    let copied = 0;
    this.total -= count;
    while (copied < count) {
      const chunk = this.chunks[this.first]!;
      const take = Math.min(chunk.length - this.offset, count - copied);
      chunk.copy(target, targetOffset + copied, this.offset, this.offset + take);
      copied += take;
      this.advance(take, chunk.length - this.offset);
    }
    return count;
  }

  /** Drops up to `n` buffered bytes without copying; returns how many were dropped. */
  skip(n: number): number {
    const dropped = Math.min(n, this.total);
    let left = dropped;
    this.total -= dropped;
    while (left > 0) {
      const chunk = this.chunks[this.first]!;
      const take = Math.min(chunk.length - this.offset, left);
      left -= take;
      this.advance(take, chunk.length - this.offset);
    }
    return dropped;
  }

  private advance(n: number, availInHead: number): void {
    if (n < availInHead) {
      this.offset += n;
      return;
    }
    this.first++;
    this.offset = 0;
    if (this.first === this.chunks.length) {
      this.chunks.length = 0;
      this.first = 0;
    } else if (this.first > 64) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }
}
