/**
 * A remote NBD export as the bottom of a qcow2 backing chain (a backing file name such as
 * `nbd://host/base` or `nbd+unix:///base?socket=…`, format raw): reads of clusters the overlay
 * never wrote come from the server; writes never reach it (the layer is opened read-only).
 *
 * Block status: the server's base:allocation hole and zero bits, all at depth 1 — as qemu counts
 * a protocol layer (everything in it is "allocated", holes read as zeroes). A server that offers
 * no block status reads as data throughout. The connection reconnects as the nbd backend does:
 * a read waits up to `reconnectDelayMs` for a lost server.
 */
import type { Extent } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import { openNbd, type NbdBackend, type OpenNbdOptions } from './nbd.js';
import type { ImageLayer } from './qcow2/layer.js';

export class NbdLayer implements ImageLayer {
  readonly format = 'raw' as const;
  readonly backing = null;

  private constructor(
    readonly path: string,
    readonly remote: NbdBackend,
  ) {}

  get size(): number {
    return this.remote.size;
  }

  static async open(uri: string, options: Omit<OpenNbdOptions, 'readOnly'> = {}): Promise<NbdLayer> {
    return new NbdLayer(uri, await openNbd(uri, { ...options, readOnly: true }));
  }

  async readInto(buf: Buffer, offset: number): Promise<void> {
    const data = await this.remote.read(offset, buf.length);
    if (data.length !== buf.length) throw new NbddError(Errno.EIO, `${this.path}: short read (${data.length} of ${buf.length} bytes)`);
    data.copy(buf);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const extents = await this.remote.blockStatus(offset, Math.min(length, this.size - offset));
    return extents.map((e) => ({ ...e, depth: 1 }));
  }

  close(): Promise<void> {
    return this.remote.close();
  }
}

