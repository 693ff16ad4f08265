/**
 * A daemon carries only the Node modules it uses: `tls` (with its bundled CA list), `crypto`,
 * `http` and `zlib` cost about 1.7 MiB of heap together, and they are loaded on first use —
 * STARTTLS or an nbds:// upstream, a copy-before-write scratch file, a metrics listener, a deflate
 * cluster or a sidecar bitmap file — not when the modules that may need them are imported.
 * Checked in a fresh node process (vitest's own worker has them).
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const DIST = join(import.meta.dirname, '../../dist');

/** The Node built-in modules a fresh process has loaded after importing `modules` from dist/. */
function builtinsAfterImporting(modules: string[]): string[] {
  const script = `${modules.map((m) => `await import(${JSON.stringify(join(DIST, m))});`).join('\n')}
    process.stdout.write(JSON.stringify(process.moduleLoadList));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as string[]).filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice('NativeModule '.length));
}

describe('modules a daemon loads at start', () => {
  it('serve, attach, the NBD server and client, the backends, layers and bitmap stores load no tls, crypto, http or zlib', () => {
    const loaded = builtinsAfterImporting([
      'cli/commands.js',
      'cli/serve.js',
      'cli/attach.js',
      'nbd/server/server.js',
      'nbd/client/client.js',
      'backends/open.js',
      'backends/nbd.js',
      'layers/copy-before-write.js',
      'runtime/device.js',
      'runtime/metrics.js',
      'backends/qcow2/image.js',
      'bitmaps/store-sidecar-file.js',
      'bitmaps/store-qcow2.js',
    ]);
    expect(loaded).toContain('net'); // the probe works: what they do use is there
    expect(loaded.filter((m) => /^(tls|_tls_wrap|crypto|http|https|_http_server|zlib)$/.test(m))).toEqual([]);
  });
});
