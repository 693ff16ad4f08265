/**
 * Partitions on attach: the kernel reads a new nbd device's partition table only when something
 * asks (udev does not, for nbd), so `/dev/nbdNp1…` would appear only after `blockdev --rereadpt`.
 * `scanPartitions` asks, right after the device is connected and before attach reports ready.
 *
 * The scan reads the device, and this process serves it: the ioctl runs in a child process
 * (`blockdev --rereadpt`), never on the event loop that must answer the reads.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { logger } from '../core/log.js';
import { partitionsOf } from './holders.js';

const log = logger('partitions');

/** Rescans `/dev/DEV`'s partition table; returns the partitions found (their /dev nodes exist). */
export async function scanPartitions(dev: string): Promise<string[]> {
  const path = `/dev/${dev}`;
  const err = await new Promise<string | null>((resolve) => {
    execFile('blockdev', ['--rereadpt', path], { timeout: 120_000 }, (e, _out, stderr) => resolve(e ? stderr.trim() || e.message : null));
  });
  if (err) {
    // EINVAL: the driver has partitions off (nbd max_part=0); EBUSY: partitions in use.
    log.warn(`${path}: partition scan failed (${err}); partitions may be missing`);
    return partitionsOf(dev);
  }
  const parts = partitionsOf(dev);
  // devtmpfs adds the nodes as the kernel adds the partitions; wait briefly for a slow one.
  for (let i = 0; i < 100 && !parts.every((p) => existsSync(`/dev/${p}`)); i++) await new Promise((r) => setTimeout(r, 20));
  if (parts.length > 0) log.info(`${path}: partitions ${parts.join(', ')}`);
  return parts;
}
