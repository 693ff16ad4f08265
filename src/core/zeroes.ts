/** Whether a buffer holds only zero bytes, compared a chunk at a time against one shared zero chunk. */

const CHUNK = 64 * 1024;
let zeroes: Buffer | null = null; // made on first use

/** Whether every byte of `buf` is zero (true for an empty one). Stops at the first chunk that is not. */
export function isAllZero(buf: Buffer): boolean {
  // Data nearly always shows at one end: no compare, no views made, on the READ path.
  if (buf.length > 0 && (buf[0] !== 0 || buf[buf.length - 1] !== 0)) return false;
  zeroes ??= Buffer.alloc(CHUNK);
  for (let i = 0; i < buf.length; i += CHUNK) {
    const n = Math.min(CHUNK, buf.length - i);
    if (!buf.subarray(i, i + n).equals(zeroes.subarray(0, n))) return false;
  }
  return true;
}
