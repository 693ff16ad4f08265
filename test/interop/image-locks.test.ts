/**
 * nbdd and QEMU keep out of each other's images (src/io/image-lock.ts): nbdd takes QEMU's image
 * locks as well as its own flock, so a qemu-img, qemu-nbd or VM refuses an image nbdd writes and
 * nbdd refuses one they write — the way two QEMU programs refuse each other. Readers share.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';
import { startQemuNbdAt } from './nbd-peers.js';

let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  for (const t of ['qemu-img', 'qemu-nbd']) requireTool(t);
  dir = tempDir('nbdd-locks-');
});
afterAll(() => dir.remove());

const WRITE_LOCK = /Failed to get (shared )?"write" lock/;

function image(format: 'qcow2' | 'raw'): string {
  const path = join(dir.path, `img-${Math.random().toString(36).slice(2)}.${format}`);
  run('qemu-img', ['create', '-q', '-f', format, path, '16M']);
  return path;
}

/** `nbdd serve` that must be refused: its exit status and message. */
function serveRefused(path: string, args: string[]): { status: number; stderr: string } {
  const r = runStatus(NBDD, ['serve', path, '--socket', join(dir.path, 'never.sock'), ...args]);
  return { status: r.status, stderr: r.stderr };
}

describe('image locks shared with QEMU', () => {
  for (const format of ['qcow2', 'raw'] as const) {
    it(`${format}: an image nbdd writes is refused by qemu-io and qemu-nbd; qemu-io -U still reads it`, async () => {
      const path = image(format);
      const srv = await serveNbdd(path, ['-f', format]);
      try {
        // A writer is refused (for qcow2 a reader too; qemu lets a read-only raw open share writes).
        const write = runStatus('qemu-io', ['-f', format, '-c', 'write 0 4k', path]);
        expect(write.stderr + write.stdout).toMatch(WRITE_LOCK);
        if (format === 'qcow2') expect(runStatus('qemu-io', ['-r', '-f', format, '-c', 'read 0 4k', path]).stderr).toMatch(WRITE_LOCK);
        expect(runStatus('qemu-io', ['-r', '-U', '-f', format, '-c', 'read 0 4k', path]).stdout).toMatch(/read 4096\/4096 bytes/);
        const qnbd = runStatus('qemu-nbd', ['-k', join(dir.path, 'q.sock'), '-f', format, path]);
        expect(qnbd.status).not.toBe(0);
        expect(qnbd.stderr).toMatch(WRITE_LOCK);
      } finally {
        await srv.stop();
      }
      expect(runStatus('qemu-io', ['-f', format, '-c', 'write 0 4k', path]).stdout).toMatch(/wrote 4096\/4096 bytes/); // released with the process
    });

    it(`${format}: an image qemu-nbd writes is refused by nbdd, for reading and for writing`, async () => {
      const path = image(format);
      const peer = await startQemuNbdAt(join(dir.path, `qw-${format}.sock`), '', ['-f', format, path]);
      try {
        for (const args of [['-r'], []]) {
          const r = serveRefused(path, ['-f', format, ...args]);
          expect(r.status).not.toBe(0);
          expect(r.stderr).toMatch(/is in use: a QEMU program \(qemu-nbd, qemu-img, a VM; lock byte [12]0[13]\) (holds|does not share) the (write|resize) permission/);
        }
        const info = runStatus(NBDD, ['info', path]);
        expect(info.status).not.toBe(0);
        expect(info.stderr).toMatch(/is in use/);
      } finally {
        await peer.stop();
      }
    });
  }

  it('readers share: qemu-nbd -r beside nbdd serve -r; a writer of either kind is refused', async () => {
    const path = image('qcow2');
    const peer = await startQemuNbdAt(join(dir.path, 'qr.sock'), '', ['-r', '-f', 'qcow2', path]);
    try {
      const srv = await serveNbdd(path, ['-r']);
      try {
        expect(runStatus('qemu-img', ['info', path]).status).toBe(0);
        const w = runStatus('qemu-io', ['-c', 'write 0 4k', path]);
        expect(w.status).not.toBe(0);
        expect(w.stderr + w.stdout).toMatch(/Failed to get "write" lock/);
      } finally {
        await srv.stop();
      }
      const r = serveRefused(path, []);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/lock byte 201\) does not share the write permission; refusing to open it for writing/);
    } finally {
      await peer.stop();
    }
  });
});
