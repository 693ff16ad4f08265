/** Argument parsers shared by CLI commands (commander reports their errors with usage help). */
import { InvalidArgumentError } from 'commander';
import { messageOf } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { parseMetricsAddress, type MetricsListen } from '../runtime/metrics.js';

/** `--reconnect-delay`, for every command that opens an image that may be an NBD URI. */
export const RECONNECT_HELP = 'NBD URIs: seconds a request waits for a lost connection to the server to come back before it fails with EIO; nbdd keeps reconnecting (0: fail at once)';
export const DEFAULT_RECONNECT_DELAY_S = 30;
export const REQUEST_TIMEOUT_HELP = 'NBD URIs: seconds a request may go without a reply before its connection is dropped and it is sent again on a new one (0: no limit)';

export function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError(messageOf(err));
  }
}

export function intArg(min: number, max: number): (value: string) => number {
  return (value) => {
    if (!/^\d+$/.test(value)) throw new InvalidArgumentError(`'${value}' is not a whole number`);
    const n = Number(value);
    if (n < min || n > max) throw new InvalidArgumentError(`${n} is not between ${min} and ${max}`);
    return n;
  };
}

/** `--metrics ADDR:PORT`. */
export function metricsArg(value: string): MetricsListen {
  try {
    return parseMetricsAddress(value);
  } catch (err) {
    throw new InvalidArgumentError(messageOf(err));
  }
}

export const METRICS_HELP = 'serve Prometheus metrics at http://ADDR:PORT/metrics (PORT alone: 127.0.0.1; :PORT: every address)';
