/** Argument parsers shared by CLI commands (commander reports their errors with usage help). */
import { InvalidArgumentError } from 'commander';
import { messageOf } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { parseMetricsAddress, type MetricsListen } from '../runtime/metrics.js';

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
