/** Argument parsers shared by CLI commands (commander reports their errors with usage help). */
import { InvalidArgumentError, type Command } from 'commander';
import type { RemoteOptions } from '../backends/open.js';
import { DEFAULT_MAX_IN_FLIGHT } from '../backends/remote.js';
import { messageOf } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { parseMetricsAddress, type MetricsListen } from '../runtime/metrics.js';

/** `--reconnect-delay`, for every command that opens an image that may be an NBD URI. */
export const RECONNECT_HELP = 'NBD URIs: seconds a request waits for a lost connection to the server to come back before it fails with EIO; nbdd keeps reconnecting (0: fail at once)';
export const DEFAULT_RECONNECT_DELAY_S = 30;
/** `--max-bitmaps`, for serve and attach. */
export const MAX_BITMAPS_HELP = 'most dirty bitmaps the device keeps (a write into granules not yet dirty in all enabled ones marks each of them)';
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

export const ALLOW_REMOTE_BACKING_HELP = 'follow a qcow2 backing file that is an NBD URI (off: refused, since an image from elsewhere could name any server or local socket)';

/** The options of commands that serve an image which is, or sits on, an NBD server. */
export interface RemoteCliOptions {
  reconnectDelay: number;
  requestTimeout: number;
  maxInFlight: number;
  allowRemoteBacking?: boolean;
}

/** Adds --reconnect-delay, --request-timeout, --max-in-flight and --allow-remote-backing to `cmd`. */
export function addRemoteOptions(cmd: Command): Command {
  return cmd
    .option('--reconnect-delay <seconds>', RECONNECT_HELP, intArg(0, 86400), DEFAULT_RECONNECT_DELAY_S)
    .option('--request-timeout <seconds>', REQUEST_TIMEOUT_HELP, intArg(0, 86400), 0)
    .option('--max-in-flight <n>', 'NBD URIs and remote backing files: most requests in flight to the server, over all connections', intArg(1, 4096), DEFAULT_MAX_IN_FLIGHT)
    .option('--allow-remote-backing', ALLOW_REMOTE_BACKING_HELP);
}

export function remoteOptions(o: RemoteCliOptions): RemoteOptions {
  return { reconnectDelayMs: o.reconnectDelay * 1000, requestTimeoutMs: o.requestTimeout * 1000, maxInFlight: o.maxInFlight, allowRemoteBacking: !!o.allowRemoteBacking };
}

/** The same options as arguments (for a daemon child that parses them again). */
export function remoteArgs(o: RemoteCliOptions): string[] {
  const args = ['--reconnect-delay', String(o.reconnectDelay), '--request-timeout', String(o.requestTimeout), '--max-in-flight', String(o.maxInFlight)];
  if (o.allowRemoteBacking) args.push('--allow-remote-backing');
  return args;
}
