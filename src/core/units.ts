/** Human sizes: "64M", "1G", "4096", "1.5G" (binary units, optional trailing "iB"/"B"). */
import { Errno, NbddError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

export function parseSize(value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?$/i.exec(value.trim());
  if (!m) throw new NbddError(Errno.EINVAL, `'${value}' is not a size (e.g. 512, 64M, 10G)`);
  const bytes = Math.round(Number(m[1]) * UNITS[m[2]!.toUpperCase()]!);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new NbddError(Errno.EINVAL, `size '${value}' is out of range`);
  return bytes;
}

export function formatSize(bytes: number): string {
  for (const [unit, scale] of [['T', 2 ** 40], ['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) {
    if (bytes >= scale) return `${+(bytes / scale).toFixed(2)} ${unit}iB`;
  }
  return `${bytes} B`;
}
