import { accessSync, constants, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { NODE_FLAGS } from '../../src/core/node-flags.js';
import { unitText } from '../../src/cli/install-systemd.js';

const BIN = new URL('../../bin/nbdd', import.meta.url).pathname;

describe("node's flags for nbdd", () => {
  it('bin/nbdd starts node with exactly NODE_FLAGS, and is executable', () => {
    const first = readFileSync(BIN, 'utf8').split('\n')[0]!;
    expect(first).toBe(`#!/usr/bin/env -S node ${NODE_FLAGS.join(' ')}`);
    accessSync(BIN, constants.X_OK);
  });

  it('the systemd attach unit runs node with them too', () => {
    expect(unitText('nbdd@.service')).toMatch(new RegExp(`^ExecStart=\\S+/node ${NODE_FLAGS.join(' ')} \\S+/bin/nbdd attach`, 'm'));
  });
});
