/** The control-socket commands: nbdd bitmap …, nbdd status, nbdd events against `nbdd serve`. */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

let dir: ReturnType<typeof tempDir>;
beforeAll(() => {
  requireTool('qemu-io');
  dir = tempDir('nbdd-cli-');
});
afterAll(() => dir.remove());

describe('nbdd bitmap / status / events', () => {
  it('manages bitmaps, reports status and streams dirty events through the sidecar', async () => {
    const img = join(dir.path, 'd.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', img, '16M']);
    const sc = join(dir.path, 'sc');
    const srv = await serveNbdd(img, ['--export-name', 'd', '--sidecar', sc]);
    try {
      run(NBDD, ['bitmap', 'add', sc, 'b0']);
      run(NBDD, ['bitmap', 'add', sc, 'fine', '-g', '4K', '--transient']);
      const events = spawn(NBDD, ['events', sc, '-t', 'dirty'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      events.stdout.on('data', (b) => (out += b));
      await new Promise((r) => setTimeout(r, 700)); // let it subscribe
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 1M 8k', srv.uri]);
      for (let i = 0; i < 50 && !out.includes('\n'); i++) await new Promise((r) => setTimeout(r, 50));
      events.kill('SIGTERM');
      const ev = JSON.parse(out.split('\n')[0]!);
      expect(ev).toMatchObject({ type: 'dirty', extents: [[1048576, 8192]] });

      run(NBDD, ['bitmap', 'checkpoint', sc, 'b1']);
      const list = JSON.parse(run(NBDD, ['bitmap', 'list', sc, '--json']));
      expect(list.map((b: { name: string; enabled: boolean; persistent: boolean; dirtyBytes: number }) => [b.name, b.enabled, b.persistent, b.dirtyBytes])).toEqual([
        ['b0', false, true, 65536],
        ['fine', false, false, 8192],
        ['b1', true, true, 0],
      ]);
      run(NBDD, ['bitmap', 'merge', sc, 'b1', 'b0', 'fine']);
      run(NBDD, ['bitmap', 'enable', sc, 'fine']);
      run(NBDD, ['bitmap', 'clear', sc, 'b0']);
      run(NBDD, ['bitmap', 'remove', sc, 'fine']);
      const status = JSON.parse(run(NBDD, ['status', sc, '--json']));
      expect(status).toMatchObject({ name: 'd', size: 16 * 1024 * 1024, backend: 'raw', bitmapStore: { kind: 'sidecar-file' }, backup: null });
      expect(status.bitmaps.map((b: { name: string; dirtyBytes: number }) => [b.name, b.dirtyBytes])).toEqual([['b0', 0], ['b1', 65536]]);
      expect(run(NBDD, ['status', sc])).toMatch(/bitmaps: +b0 \(disabled, 0 B dirty\), b1 \(enabled, 64 KiB dirty\)/);
      const bad = runStatus(NBDD, ['bitmap', 'remove', sc, 'nope']);
      expect(bad.status).not.toBe(0);
      expect(bad.stderr).toMatch(/no bitmap named 'nope'/);
      const dup = runStatus(NBDD, ['bitmap', 'add', sc, 'b1']);
      expect(dup.stderr).toMatch(/already exists/);
      expect(runStatus(NBDD, ['status', join(dir.path, 'nowhere')]).stderr).toMatch(/no nbdd sidecar/);
    } finally {
      await srv.stop();
    }
  });
});
