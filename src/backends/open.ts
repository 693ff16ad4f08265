/**
 * From what a user names (a file path, a block device, an NBD URI, `memory:SIZE`) to an open
 * backend. The single place that knows every format; frontends and commands call `openImage`.
 * The qcow2 backend and the NBD client are loaded when an image needs them: a daemon serving a
 * raw file or a remote export holds less code (docs/performance.md).
 */
import type { Backend } from '../core/backend.js';
import { parseSize } from '../core/units.js';
import { isNbdUri } from '../nbd/uri.js';
import { MemoryBackend } from './memory.js';
import type { ImageLayer } from './qcow2/layer.js';
import { probeFormat } from './probe.js';
import { RawBackend } from './raw.js';

export { probeFormat };

export const FORMATS = ['auto', 'raw', 'qcow2'] as const;
export type Format = (typeof FORMATS)[number];

/** How nbdd talks to an NBD server: the image itself (a URI) or a qcow2 image's remote backing file. */
export interface RemoteOptions {
  /** How long a request waits for a lost connection to come back (ms; see src/backends/nbd.ts). */
  reconnectDelayMs?: number;
  /** A request without a reply for this long drops its connection (ms; 0: none). */
  requestTimeoutMs?: number;
  /** Most requests in flight to the server, over all connections (default DEFAULT_MAX_IN_FLIGHT). */
  maxInFlight?: number;
  /** Follow backing files that are NBD URIs (off: such images are refused; see OpenQcow2Options.openRemote). */
  allowRemoteBacking?: boolean;
}

export interface OpenOptions extends RemoteOptions {
  format?: Format;
  readOnly?: boolean;
  /** Open the file with O_DIRECT (raw only). */
  direct?: boolean;
  /** An NBD URI image: connections to open when the server allows multi-conn (default 1). */
  connections?: number;
}

export function isMemorySpec(image: string): boolean {
  return image.startsWith('memory:');
}

/** How a qcow2 image opens a backing file that is an NBD URI: not at all unless `allowRemoteBacking`. */
export function remoteBackingOpener(options: RemoteOptions): ((uri: string) => Promise<ImageLayer>) | undefined {
  if (!options.allowRemoteBacking) return undefined;
  const remote = { reconnectDelayMs: options.reconnectDelayMs, requestTimeoutMs: options.requestTimeoutMs, maxInFlight: options.maxInFlight };
  return async (uri) => (await import('./nbd-layer.js')).NbdLayer.open(uri, remote);
}

export async function openImage(image: string, options: OpenOptions = {}): Promise<Backend> {
  const readOnly = !!options.readOnly;
  if (isMemorySpec(image)) {
    return new MemoryBackend({ size: parseSize(image.slice('memory:'.length)), readOnly });
  }
  const remote = { reconnectDelayMs: options.reconnectDelayMs, requestTimeoutMs: options.requestTimeoutMs, maxInFlight: options.maxInFlight };
  if (isNbdUri(image)) return (await import('./nbd.js')).openNbd(image, { ...remote, readOnly, connections: options.connections });
  const probed = !options.format || options.format === 'auto';
  const format: 'raw' | 'qcow2' = probed ? await probeFormat(image) : (options.format as 'raw' | 'qcow2');
  switch (format) {
    case 'raw':
      return RawBackend.open(image, { readOnly, direct: options.direct, probed });
    case 'qcow2':
      return (await import('./qcow2/open.js')).openQcow2(image, { readOnly, openRemote: remoteBackingOpener(options) });
  }
}
