/**
 * A Backend over one Buffer for server and queue tests, with fault injection: `failNext` makes
 * the next call of an operation fail with an errno, `delayMs` holds calls back, and every call is
 * logged. (The production in-memory backend is src/backends/memory.ts; this one exists to
 * misbehave on purpose.)
 */
import { defaultCaps, type Backend, type BackendCaps, type Extent, type WriteOptions, type ZeroOptions } from '../../src/core/backend.js';
import { NbddError } from '../../src/core/errors.js';

export type Op = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'blockStatus';

interface Call {
  op: Op;
  offset?: number;
  length?: number;
  fua?: boolean;
  noHole?: boolean;
}

const BLOCK = 4096;

export class TestBackend implements Backend {
  readonly kind = 'test';
  readonly data: Buffer;
  readonly caps: BackendCaps;
  readonly calls: Call[] = [];
  private readonly allocated: boolean[];
  failNext: Partial<Record<Op, number>> = {};
  delayMs = 0;
  closed = false;
  flushes = 0;

  constructor(size: number, caps: Partial<BackendCaps> = {}) {
    this.data = Buffer.alloc(size);
    this.caps = defaultCaps({ flush: true, trim: true, writeZeroes: true, blockStatus: true, ...caps });
    this.allocated = new Array(Math.ceil(size / BLOCK)).fill(false);
  }

  /** Back to all zeroes and unallocated, with no calls logged. */
  reset(): void {
    this.data.fill(0);
    this.allocated.fill(false);
    this.calls.length = 0;
  }

  get size(): number {
    return this.data.length;
  }

  private async enter(call: Call): Promise<void> {
    this.calls.push(call);
    if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
    const errno = this.failNext[call.op];
    if (errno) {
      delete this.failNext[call.op];
      throw new NbddError(errno, `injected ${call.op} failure`);
    }
  }

  private mark(offset: number, length: number, value: boolean): void {
    for (let b = Math.floor(offset / BLOCK); b * BLOCK < offset + length; b++) this.allocated[b] = value;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    await this.enter({ op: 'read', offset, length });
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    await this.enter({ op: 'write', offset, length: data.length, fua: !!options?.fua });
    data.copy(this.data, offset);
    this.mark(offset, data.length, true);
  }

  async flush(): Promise<void> {
    await this.enter({ op: 'flush' });
    this.flushes++;
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.enter({ op: 'trim', offset, length });
    this.data.fill(0, offset, offset + length);
    this.mark(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    await this.enter({ op: 'writeZeroes', offset, length, noHole: !!options?.noHole });
    this.data.fill(0, offset, offset + length);
    this.mark(offset, length, !!options?.noHole);
  }

  /** 4 KiB granularity: written blocks are data (depth 1), the rest holes that read as zero. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    await this.enter({ op: 'blockStatus', offset, length });
    const out: Extent[] = [];
    for (let at = offset; at < offset + length; ) {
      const alloc = this.allocated[Math.floor(at / BLOCK)]!;
      const end = Math.min(this.size, (Math.floor(at / BLOCK) + 1) * BLOCK);
      const last = out[out.length - 1];
      if (last && last.hole === !alloc) last.length += end - at;
      else out.push({ length: end - at, hole: !alloc, zero: !alloc, depth: alloc ? 1 : 0 });
      at = end;
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
