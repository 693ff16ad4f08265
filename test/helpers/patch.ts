/** Byte surgery on image files for the damaged-image tests: write bytes in place, big-endian fields. */
import { closeSync, openSync, writeSync } from 'node:fs';

/** Writes `bytes` at `offset` of the file at `path`, in place. */
export function patch(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
