/**
 * From what a user names (a file path, a block device, an NBD URI, `memory:SIZE`) to an open
 * backend. The single place that knows every format; frontends and commands call `openImage`.
 */
import { open as fsOpen } from 'node:fs/promises';
import type { Backend } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { MemoryBackend } from './memory.js';
import { openQcow2 } from './qcow2/open.js';
import { RawBackend } from './raw.js';

export const FORMATS = ['auto', 'raw', 'qcow2'] as const;
export type Format = (typeof FORMATS)[number];

export interface OpenOptions {
  format?: Format;
  readOnly?: boolean;
  /** Open the file with O_DIRECT (raw only). */
  direct?: boolean;
}

const QCOW2_MAGIC = 0x514649fb;

/** 'qcow2' when the file starts with the qcow2 magic, else 'raw'. */
export async function probeFormat(path: string): Promise<'qcow2' | 'raw'> {
  const fh = await fsOpen(path, 'r').catch((err: NodeJS.ErrnoException) => {
    throw new NbddError(err.code === 'ENOENT' ? Errno.ENOENT : Errno.EIO, `cannot open ${path}: ${err.message}`);
  });
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await fh.read(head, 0, 4, 0);
    return bytesRead === 4 && head.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

export function isMemorySpec(image: string): boolean {
  return image.startsWith('memory:');
}

export async function openImage(image: string, options: OpenOptions = {}): Promise<Backend> {
  const readOnly = !!options.readOnly;
  if (isMemorySpec(image)) {
    return new MemoryBackend({ size: parseSize(image.slice('memory:'.length)), readOnly });
  }
  const format = !options.format || options.format === 'auto' ? await probeFormat(image) : options.format;
  switch (format) {
    case 'raw':
      return RawBackend.open(image, { readOnly, direct: options.direct });
    case 'qcow2':
      return openQcow2(image, { readOnly });
  }
}
