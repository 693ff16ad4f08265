/**
 * From what a user names (a file path, a block device, an NBD URI, `memory:SIZE`) to an open
 * backend. The single place that knows every format; frontends and commands call `openImage`.
 */
import type { Backend } from '../core/backend.js';
import { parseSize } from '../core/units.js';
import { isNbdUri } from '../nbd/uri.js';
import { MemoryBackend } from './memory.js';
import { openNbd } from './nbd.js';
import { openQcow2, probeFormat } from './qcow2/index.js';
import { RawBackend } from './raw.js';

export { probeFormat };

export const FORMATS = ['auto', 'raw', 'qcow2'] as const;
export type Format = (typeof FORMATS)[number];

export interface OpenOptions {
  format?: Format;
  readOnly?: boolean;
  /** Open the file with O_DIRECT (raw only). */
  direct?: boolean;
  /** NBD URIs: how long a request waits for a lost connection to come back (ms; see src/backends/nbd.ts). */
  reconnectDelayMs?: number;
  /** NBD URIs: a request without a reply for this long drops its connection (ms; 0: none). */
  requestTimeoutMs?: number;
}

export function isMemorySpec(image: string): boolean {
  return image.startsWith('memory:');
}

export async function openImage(image: string, options: OpenOptions = {}): Promise<Backend> {
  const readOnly = !!options.readOnly;
  if (isMemorySpec(image)) {
    return new MemoryBackend({ size: parseSize(image.slice('memory:'.length)), readOnly });
  }
  if (isNbdUri(image)) return openNbd(image, { readOnly, reconnectDelayMs: options.reconnectDelayMs, requestTimeoutMs: options.requestTimeoutMs });
  const probed = !options.format || options.format === 'auto';
  const format: 'raw' | 'qcow2' = probed ? await probeFormat(image) : (options.format as 'raw' | 'qcow2');
  switch (format) {
    case 'raw':
      return RawBackend.open(image, { readOnly, direct: options.direct, probed });
    case 'qcow2':
      return openQcow2(image, { readOnly });
  }
}
