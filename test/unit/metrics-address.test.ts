/** `--metrics ADDR:PORT` parsing: the accepted forms and the refused ones. */
import { describe, expect, it } from 'vitest';
import { parseMetricsAddress } from '../../src/runtime/metrics.js';

describe('parseMetricsAddress', () => {
  it.each([
    ['9500', { host: '127.0.0.1', port: 9500 }],
    [':9500', { host: '::', port: 9500 }],
    ['0.0.0.0:9500', { host: '0.0.0.0', port: 9500 }],
    ['[::1]:0', { host: '::1', port: 0 }],
    ['localhost:65535', { host: 'localhost', port: 65535 }],
  ])('%s', (spec, want) => expect(parseMetricsAddress(spec)).toEqual(want));

  it.each(['', 'localhost', '127.0.0.1:', '1.2.3.4:65536', '::1:9500', '[::1]', '[zz]:1', 'a:b', '1:2:3', '9500x', ' 9500'])('refuses %j', (spec) => {
    expect(() => parseMetricsAddress(spec)).toThrow(/is not ADDR:PORT/);
  });
});
