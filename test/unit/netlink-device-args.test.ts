import { describe, expect, it } from 'vitest';
import { checkName } from '../../src/core/paths.js';
import { backendIdFor, canonicalImage } from '../../src/kernel/device.js';
import { parseDeviceArg } from '../../src/kernel/sysfs.js';
import { explicitDriver } from '../../src/cli/attach.js';

describe('device arguments', () => {
  it('parses /dev/nbdN, nbdN and N, and nothing else', () => {
    expect(parseDeviceArg('/dev/nbd12')).toBe(12);
    expect(parseDeviceArg('nbd0')).toBe(0);
    expect(parseDeviceArg('3')).toBe(3);
    for (const bad of ['/dev/nbd', 'nbd1p1', '/dev/sda', 'disk', '/dev/nbd-1', '']) expect(parseDeviceArg(bad), bad).toBeUndefined();
  });

  it('accepts names a udev link and a file name can carry', () => {
    for (const ok of ['disk', 'vm-1.root', 'A_b', 'x'.repeat(64)]) expect(checkName(ok)).toBe(ok);
    for (const bad of ['', '.hidden', '-x', 'a/b', 'a b', 'a:b', 'x'.repeat(65), 'é']) expect(() => checkName(bad), bad).toThrow(/device name/);
    expect(backendIdFor('disk')).toBe('nbdd:disk');
  });

  it('makes file paths absolute and leaves URIs and memory specs alone', () => {
    expect(canonicalImage('/a/b.img')).toBe('/a/b.img');
    expect(canonicalImage('b.img')).toBe(`${process.cwd()}/b.img`);
    expect(canonicalImage('memory:64M')).toBe('memory:64M');
    expect(canonicalImage('nbd+unix:///x?socket=/s')).toBe('nbd+unix:///x?socket=/s');
  });

  it('--driver auto: the device path, then the driver-only options, decide; otherwise still open', () => {
    const none = (): boolean => false;
    const only = (...names: string[]) => (o: string): boolean => names.includes(o);
    expect(explicitDriver({ driver: 'nbd' }, only('queues'))).toBe('nbd');
    expect(explicitDriver({ driver: 'ublk' }, only('connections'))).toBe('ublk');
    expect(explicitDriver({ device: '/dev/ublkb3' }, only('connections'))).toBe('ublk');
    expect(explicitDriver({ driver: 'auto', device: '/dev/nbd3' }, none)).toBe('nbd');
    for (const o of ['connections', 'timeout', 'deadConnTimeout', 'partitions']) expect(explicitDriver({}, only(o)), o).toBe('nbd');
    for (const o of ['queues', 'depth', 'queueThreads']) expect(explicitDriver({ driver: 'auto' }, only(o)), o).toBe('ublk');
    expect(explicitDriver({}, none)).toBeUndefined();
    expect(explicitDriver({ driver: 'auto' }, only('readOnly', 'name'))).toBeUndefined();
  });
});
