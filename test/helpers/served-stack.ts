/**
 * A device stack exported by a fresh NbdServer, and connections to it served the way the kernel's
 * are (a socketpair in the transmission phase; the test is the kernel). For the tests of spliced
 * reads and writes, which drive the server's sockets by hand.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import type { Backend } from '../../src/core/backend.js';
import { NbdExport } from '../../src/nbd/server/export.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { buildStack, type DeviceStack } from '../../src/runtime/stack.js';
import { socketPair } from '../../src/sys/libc.js';
import { ScriptClient } from './nbd-script.js';

export class ServedStack {
  server: NbdServer | null = null;
  stack: DeviceStack | null = null;
  /** Peers to drop before the server closes (a test that failed may leave one that never reads). */
  private readonly peers: ScriptClient[] = [];
  private readonly dirs: string[] = [];

  /** A fresh directory under `base`, removed at `close`. */
  tempDir(base: string): string {
    const dir = mkdtempSync(join(base, 'nbdd-splice-'));
    this.dirs.push(dir);
    return dir;
  }

  /** The device stack over `backend` (which it then owns), exported as 'disk'. */
  async export(backend: Backend, bitmaps?: BitmapSet): Promise<DeviceStack> {
    this.stack = buildStack(backend, bitmaps ?? (await BitmapSet.open(backend.size, null)));
    this.server = new NbdServer({});
    this.server.addExport(new NbdExport({ name: 'disk', queue: this.stack.queue }));
    return this.stack;
  }

  /** A connection served as the kernel's are. `ours`: the daemon's end; `peer`: the test's. */
  kernelConnection(): { c: ScriptClient; ours: number; peer: number } {
    const [peer, ours] = socketPair();
    this.server!.serveTransmission(ours, 'disk');
    const c = this.adopt(ScriptClient.over(new net.Socket({ fd: peer, readable: true, writable: true })));
    return { c, ours, peer };
  }

  /** Dropped at `close`, before the server. */
  adopt(c: ScriptClient): ScriptClient {
    this.peers.push(c);
    return c;
  }

  async close(): Promise<void> {
    for (const p of this.peers.splice(0)) p.destroy();
    await this.server?.close();
    this.server = null;
    await this.stack?.close();
    this.stack = null;
    for (const d of this.dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  }
}

/** A deterministic image: byte i is a hash of i (xor `seed`), so a misplaced or stale range shows. */
export function image(size: number, seed = 0): Buffer {
  const b = Buffer.alloc((size + 3) & ~3);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE((Math.imul(i, 2654435761) ^ (i >>> 7) ^ seed) >>> 0, i);
  return b.subarray(0, size);
}

export async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 10));
  }
}
