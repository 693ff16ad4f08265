/** TurnWriter: order, one large buffer on the socket at a time, counted backlog, failures. */
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { turnEnd } from '../../src/core/batch.js';
import { LARGE_WRITE, TurnWriter } from '../../src/nbd/turn-writer.js';
import { prng } from '../helpers/prng.js';

const MiB = 1024 * 1024;

/** A connected pair over a unix socket: `writer` writes, `peer` reads (paused until asked). */
async function pair(): Promise<{ writer: net.Socket; peer: net.Socket; cleanup: () => void }> {
  const dir = mkdtempSync(join(tmpdir(), 'nbdd-tw-'));
  const path = join(dir, 's');
  const accepted = new Promise<net.Socket>((resolve) => {
    const server = net.createServer((s) => {
      server.close();
      s.pause();
      resolve(s);
    });
    server.listen(path);
  });
  await new Promise((r) => setTimeout(r, 10));
  const writer = net.connect(path);
  await new Promise<void>((resolve) => writer.once('connect', resolve));
  const peer = await accepted;
  return {
    writer,
    peer,
    cleanup: () => {
      writer.destroy();
      peer.destroy();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Everything the peer receives until the writer ends. */
function receiveAll(peer: net.Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  peer.on('data', (c: Buffer) => chunks.push(c));
  peer.resume();
  return new Promise((resolve) => peer.on('end', () => resolve(Buffer.concat(chunks))));
}

const filled = (n: number, v: number): Buffer => Buffer.alloc(n, v);

let cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups) c();
  cleanups = [];
});

describe('TurnWriter', () => {
  it('sends every byte in the order written, over turns, and reports every buffer written', async () => {
    const { writer, peer, cleanup } = await pair();
    cleanups.push(cleanup);
    const out = new TurnWriter(writer);
    const next = prng(7);
    const int = (lo: number, hi: number): number => lo + Math.floor(next() * (hi - lo + 1));
    const sent: Buffer[] = [];
    const done: boolean[] = [];
    const received = receiveAll(peer);
    for (let turn = 0; turn < 40; turn++) {
      for (let k = int(1, 6); k > 0; k--) {
        const size = int(0, 3) === 0 ? int(LARGE_WRITE, 3 * LARGE_WRITE) : int(1, 4096);
        const buf = filled(size, sent.length & 0xff);
        sent.push(buf);
        const i = done.push(false) - 1;
        out.write(buf, (ok) => (done[i] = ok));
      }
      await turnEnd();
    }
    out.flushNow();
    writer.end();
    expect((await received).equals(Buffer.concat(sent))).toBe(true);
    await new Promise((r) => setImmediate(r));
    expect(done.every(Boolean)).toBe(true);
  });

  it('gives a large buffer back once its own bytes are sent, while later ones still wait', async () => {
    const { writer, peer, cleanup } = await pair();
    cleanups.push(cleanup);
    const out = new TurnWriter(writer);
    const pendingAtFirst: number[] = [];
    out.write(filled(16, 1));
    out.write(filled(MiB, 2), () => pendingAtFirst.push(out.pendingBytes));
    out.write(filled(16, 3));
    out.write(filled(MiB, 4));
    out.write(filled(MiB, 5));
    const received = receiveAll(peer);
    await turnEnd();
    // Node completes a writev as a whole: had the three buffers gone out together, the first
    // would come back only with the last byte of the third.
    await new Promise<void>((resolve) => {
      const wait = (): void => void (pendingAtFirst.length ? resolve() : setTimeout(wait, 5));
      wait();
    });
    expect(pendingAtFirst[0]).toBeGreaterThan(MiB);
    out.flushNow(); // what waits goes to the socket before its end
    writer.end();
    expect((await received).length).toBe(3 * MiB + 32);
  });

  it('counts the writes waiting behind a large buffer in pendingBytes (a peer that does not read)', async () => {
    const { writer, cleanup } = await pair();
    cleanups.push(cleanup);
    const out = new TurnWriter(writer);
    for (let i = 0; i < 4; i++) {
      out.write(filled(64, i));
      out.write(filled(MiB, i));
    }
    await turnEnd();
    await new Promise((r) => setTimeout(r, 50));
    // The kernel takes at most its socket buffer; everything else is counted.
    expect(out.pendingBytes).toBeGreaterThan(3 * MiB);
  });

  it('reports failure for every write, waiting ones included, when the socket dies', async () => {
    const { writer, peer, cleanup } = await pair();
    cleanups.push(cleanup);
    const out = new TurnWriter(writer);
    const results: boolean[] = [];
    for (let i = 0; i < 6; i++) out.write(filled(i % 2 ? MiB : 100, i), (ok) => results.push(ok));
    await turnEnd();
    writer.on('error', () => undefined);
    peer.destroy();
    writer.destroy();
    await new Promise((r) => setTimeout(r, 50));
    expect(results).toHaveLength(6);
    expect(results.filter((ok) => !ok).length).toBeGreaterThan(0);
  });
});
