/** A ControlledDevice over a transient BitmapSet, for control-socket tests. */
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { DeviceEvents } from '../../src/control/events.js';
import type { BackupBeginParams, ControlledDevice } from '../../src/control/methods.js';

export class FakeDevice implements ControlledDevice {
  readonly name = 'fake';
  readonly events = new DeviceEvents();
  backups: BackupBeginParams[] = [];
  private constructor(readonly bitmaps: BitmapSet) {}
  static async create(size = 1 << 20): Promise<FakeDevice> {
    return new FakeDevice(await BitmapSet.open(size, null));
  }
  status() {
    return { name: this.name, size: this.bitmaps.size };
  }
  stats() {
    return { write: { count: 0 } };
  }
  async backupBegin(p: BackupBeginParams) {
    this.backups.push(p);
    return { export: 'backup' };
  }
  async backupEnd() {}
}
