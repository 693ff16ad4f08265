/**
 * One run directory for everything: with $NBDD_RUN_DIR set, a device's sidecar is created under it
 * and `nbdd status NAME` (controlSocketOf) finds it there. The sidecar once ignored the variable and
 * stayed in /run/nbdd while status looked elsewhere.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { checkName, runDir, sidecarDir } from '../../src/core/paths.js';
import { ControlClient } from '../../src/control/control-client.js';
import { controlSocketOf } from '../../src/sidecar/locate.js';
import { Sidecar } from '../../src/sidecar/sidecar.js';
import { buildStack } from '../../src/runtime/stack.js';
import { listStates, logPath, saveState } from '../../src/kernel/registry.js';
import { TestBackend } from '../helpers/test-backend.js';

describe('run directory', () => {
  let dir: string;
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env.NBDD_RUN_DIR;
    dir = mkdtempSync(join(tmpdir(), 'nbdd-run-'));
    process.env.NBDD_RUN_DIR = dir;
  });
  afterEach(() => {
    if (saved === undefined) delete process.env.NBDD_RUN_DIR;
    else process.env.NBDD_RUN_DIR = saved;
    rmSync(dir, { recursive: true, force: true });
  });

  it('is /run/nbdd unless NBDD_RUN_DIR says otherwise', () => {
    expect(runDir()).toBe(dir);
    delete process.env.NBDD_RUN_DIR;
    expect(runDir()).toBe('/run/nbdd');
  });

  it('holds the registry, the logs and the sidecars alike', () => {
    saveState({ index: 3, name: 'disk', image: '/x', format: 'raw', backendId: 'nbdd:disk', pid: process.pid, connections: 1, readOnly: false, sizeBytes: 1 << 20, blockSize: 4096 } as Parameters<typeof saveState>[0]);
    expect(existsSync(join(dir, 'nbd3.json'))).toBe(true);
    expect(listStates().map((s) => s.name)).toEqual(['disk']);
    expect(logPath('disk')).toBe(join(dir, 'disk.log'));
    expect(sidecarDir('disk')).toBe(join(dir, 'disk'));
  });

  it('a sidecar started without a dir lands there, and status NAME finds it', async () => {
    const backend = new TestBackend(1 << 20);
    const bitmaps = await BitmapSet.open(backend.size, null);
    const stack = buildStack(backend, bitmaps);
    const queue = stack.queue;
    const sidecar = await Sidecar.start({ name: 'disk0', stack });
    try {
      expect(sidecar.dir).toBe(join(dir, 'disk0'));
      expect(existsSync(join(dir, 'disk0', 'control.sock'))).toBe(true);
      const sock = controlSocketOf('disk0');
      expect(sock).toBe(join(dir, 'disk0', 'control.sock'));
      const client = await ControlClient.connect(sock);
      try {
        const status = (await client.call('status')) as { name: string };
        expect(status.name).toBe('disk0');
      } finally {
        await client.close();
      }
    } finally {
      await sidecar.close();
      await queue.close();
    }
  });

  it('refuses names that cannot be a directory or a udev link', () => {
    for (const bad of ['', '.x', '../etc', 'a/b', 'x'.repeat(65)]) {
      expect(() => sidecarDir(bad), bad).toThrow(/device name/);
      expect(() => checkName(bad), bad).toThrow(/device name/);
    }
  });
});
