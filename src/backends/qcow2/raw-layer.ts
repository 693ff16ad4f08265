/**
 * A minimal read-only raw image, only as the bottom of a qcow2 backing chain.
 *
 * The full raw backend (src/backends/raw.ts, written separately) can replace this once merged:
 * it needs `readInto` and `blockStatus` as in `ImageLayer`. Until then every byte of a raw backing
 * file reports as data at depth 1 (no SEEK_DATA probing).
 */
import { allData, type Extent } from '../../core/backend.js';
import type { FilePort } from '../../io/file-port.js';
import { openFilePort } from '../../io/open-port.js';
import type { ImageLayer } from './layer.js';

export class RawLayer implements ImageLayer {
  readonly format = 'raw' as const;
  readonly backing = null;

  private constructor(
    private readonly port: FilePort,
    readonly size: number,
  ) {}

  get path(): string {
    return this.port.path;
  }

  static async open(path: string): Promise<RawLayer> {
    const port = await openFilePort(path, { readOnly: true });
    try {
      return new RawLayer(port, await port.length());
    } catch (err) {
      await port.close();
      throw err;
    }
  }

  async readInto(buf: Buffer, offset: number): Promise<void> {
    await this.port.readAt(buf, offset);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return allData(Math.min(length, this.size - offset));
  }

  async close(): Promise<void> {
    await this.port.close();
  }
}
