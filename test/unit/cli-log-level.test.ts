/** The CLI's `--log-level` default follows NBDD_LOG, as the README says. */
import { afterEach, describe, expect, it } from 'vitest';
import { buildProgram } from '../../src/cli/main.js';

describe('--log-level default', () => {
  const saved = process.env.NBDD_LOG;
  afterEach(() => {
    if (saved === undefined) delete process.env.NBDD_LOG;
    else process.env.NBDD_LOG = saved;
  });

  it('is NBDD_LOG when that names a level, info otherwise', async () => {
    process.env.NBDD_LOG = 'debug';
    expect((await buildProgram()).opts().logLevel).toBe('debug');
    process.env.NBDD_LOG = 'chatty';
    expect((await buildProgram()).opts().logLevel).toBe('info');
    delete process.env.NBDD_LOG;
    expect((await buildProgram()).opts().logLevel).toBe('info');
  });
});
