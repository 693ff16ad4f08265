import type { BitmapStore, BitsChange, StoredBitmap } from '../../src/bitmaps/store.js';

/** A store that counts calls and can fail, to test the set's batching and error paths. */
export class CountingStore implements BitmapStore {
  readonly kind = 'counting';
  readonly location = 'memory';
  writeBitsCalls: BitsChange[][] = [];
  /** Every call in order, e.g. 'writeBits' or 'writeBits-done', for ordering assertions. */
  log: string[] = [];
  failNextWriteBits = false;
  gate: Promise<void> = Promise.resolve();
  async load() {
    return [];
  }
  async add() {}
  async remove() {}
  setEnabledCalls: [string, boolean][] = [];
  async setEnabled(name: string, enabled: boolean) {
    this.setEnabledCalls.push([name, enabled]);
  }
  async writeAll() {}
  async close(_bitmaps: StoredBitmap[]): Promise<void> {}
  async writeBits(changes: BitsChange[]) {
    this.writeBitsCalls.push(changes.map((c) => ({ ...c, runs: [...c.runs] })));
    this.log.push('writeBits');
    await this.gate;
    if (this.failNextWriteBits) {
      this.failNextWriteBits = false;
      throw new Error('disk on fire');
    }
    this.log.push('writeBits-done');
  }
}

