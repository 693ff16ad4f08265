/** Which of nbdd's modules a piece of code loads: run in a child node with a loader hook that lists them. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';

/** The URL of a module under dist/ (`cli/main.js`), for `import()` in the script. */
export function distUrl(module: string): string {
  return new URL(`../../dist/${module}`, import.meta.url).href;
}

/**
 * Runs `script` (an ES module body; top-level await allowed) in a child node and returns the dist/
 * modules it loaded, as paths under dist/ (`cli/serve.js`). The script must succeed and print
 * nothing on stderr.
 */
export function loadedModules(script: string): string[] {
  const dir = mkdtempSync(join(tmpdir(), 'nbdd-loaded-'));
  try {
    const list = join(dir, 'loaded');
    const hooks = `import { appendFileSync } from 'node:fs'; export async function load(url, ctx, next) { appendFileSync(${JSON.stringify(list)}, url + '\\n'); return next(url, ctx); }`;
    const body = [`import { register } from 'node:module';`, `register('data:text/javascript,' + encodeURIComponent(${JSON.stringify(hooks)}));`, script].join('\n');
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', body], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    return readFileSync(list, 'utf8')
      .split('\n')
      .filter((u) => u.includes('/dist/'))
      .map((u) => u.slice(u.indexOf('/dist/') + 6));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
