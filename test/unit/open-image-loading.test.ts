/**
 * `openImage` loads the qcow2 backend and the NBD client only for an image that needs them, so a
 * daemon serving a raw file holds neither (docs/performance.md, "Smaller at rest").
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createQcow2 } from '../../src/backends/qcow2/create.js';
import { distUrl, loadedModules } from '../helpers/loaded-modules.js';

const dir = mkdtempSync(join(tmpdir(), 'nbdd-open-loading-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const QCOW2 = ['backends/qcow2/open.js', 'backends/qcow2/image.js', 'backends/qcow2/write.js'];
const NBD_CLIENT = ['backends/nbd.js', 'backends/nbd-layer.js', 'nbd/client/client.js'];

/** The modules loaded by importing openImage and running `body` (which may use `openImage`). */
function loadedBy(body: string): string[] {
  return loadedModules(`const { openImage } = await import(${JSON.stringify(distUrl('backends/open.js'))});\n${body}`);
}

function expectNone(loaded: string[], modules: string[]): void {
  expect(loaded.filter((m) => modules.includes(m))).toEqual([]);
}

describe('openImage loading backends', () => {
  it('serve and a raw image load neither qcow2 nor the NBD client', () => {
    expectNone(loadedModules(`await import(${JSON.stringify(distUrl('cli/serve.js'))});`), [...QCOW2, ...NBD_CLIENT]);
    const raw = join(dir, 'disk.raw');
    writeFileSync(raw, Buffer.alloc(1 << 20, 1));
    const loaded = loadedBy(`const b = await openImage(${JSON.stringify(raw)}); if (b.kind !== 'raw') throw new Error(b.kind); await b.close();`);
    expect(loaded).toContain('backends/raw.js');
    expectNone(loaded, [...QCOW2, ...NBD_CLIENT]);
  });

  it('a qcow2 image loads the qcow2 backend and not the NBD client', async () => {
    const image = join(dir, 'disk.qcow2');
    await createQcow2(image, { size: 1 << 20 });
    const loaded = loadedBy(`const b = await openImage(${JSON.stringify(image)}); if (b.kind !== 'qcow2') throw new Error(b.kind); await b.close();`);
    for (const m of QCOW2) expect(loaded).toContain(m);
    expectNone(loaded, NBD_CLIENT);
  });

  it('an NBD URI loads the client (here to fail: no server) and not qcow2', () => {
    const uri = `nbd+unix:///?socket=${join(dir, 'nobody.sock')}`;
    const loaded = loadedBy(
      `const r = await openImage(${JSON.stringify(uri)}, { reconnectDelayMs: 0 }).then(() => 'opened', (e) => e.message);\nif (!/nobody\\.sock/.test(r)) throw new Error('unexpected: ' + r);`,
    );
    expect(loaded).toContain('backends/nbd.js');
    expect(loaded).toContain('nbd/client/client.js');
    expectNone(loaded, QCOW2);
  });
});
