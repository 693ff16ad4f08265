import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { gzipSync, gunzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { droppableMappings, dropStartupPages } from '../../src/sys/startup-pages.js';

/** One smaps entry: a header line and the fields droppableMappings reads, among others it ignores. */
function entry(range: string, perms: string, path: string, fields: { Rss?: number; Anonymous?: number; Locked?: number } = {}): string {
  const { Rss = 8, Anonymous = 0, Locked = 0 } = fields;
  return [
    `${range} ${perms} 00000000 fe:00 260689${path ? `                    ${path}` : ''}`,
    `Size:               1024 kB`,
    `Rss:                ${Rss} kB`,
    `Pss:                ${Rss} kB`,
    `Anonymous:          ${Anonymous} kB`,
    `Locked:             ${Locked} kB`,
    `THPeligible:        0`,
    `VmFlags: rd mr mw me sd`,
  ].join('\n');
}

function rssFileKb(): number {
  return Number(/RssFile:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
}

/** Anonymous kB of each read-only private file mapping that has copied pages, by start address. */
function copiedReadOnlyKb(): Map<string, number> {
  const out = new Map<string, number>();
  let key: string | null = null;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const h = /^([0-9a-f]+)-[0-9a-f]+ (r--p|r-xp) [0-9a-f]+ \S+ \d+\s+\//.exec(line);
    if (h) key = h[1]!;
    else if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) key = null;
    const a = key && /^Anonymous:\s+(\d+) kB/.exec(line);
    if (a && Number(a[1]) > 0) out.set(key!, Number(a[1]));
  }
  return out;
}

describe('start-up pages', () => {
  it('picks private read-only file mappings with resident pages and no copied or locked page', () => {
    const smaps = [
      entry('00400000-00b6f000', 'r--p', '/usr/bin/node', { Rss: 5948 }),
      entry('00b72000-025fe000', 'r-xp', '/usr/bin/node', { Rss: 16000 }),
      entry('0563a000-0563e000', 'r--p', '/usr/bin/node', { Rss: 16, Anonymous: 16 }), // RELRO, relocated
      entry('0563e000-0565d000', 'rw-p', '/usr/bin/node', { Rss: 120 }),
      entry('7f0000000000-7f0000100000', 'r--s', '/dev/shm/x', { Rss: 64 }),
      entry('7f0000200000-7f0000300000', 'r-xp', '/usr/lib/libfoo.so (deleted)', { Rss: 64 }),
      entry('7f0000400000-7f0000500000', 'r--p', '/usr/lib/x86_64-linux-gnu/libc.so.6', { Rss: 0 }),
      entry('7f0000600000-7f0000700000', 'r-xp', '/usr/lib/x86_64-linux-gnu/libc.so.6', { Rss: 900, Locked: 900 }),
      entry('7f0000800000-7f0000900000', 'r--p', '', { Rss: 100 }),
      entry('7ffd00000000-7ffd00002000', 'r-xp', '[vdso]', { Rss: 8 }),
      entry('7f0000a00000-7f0000b00000', 'r-xp', '/usr/lib/x86_64-linux-gnu/libc.so.6', { Rss: 700 }),
    ].join('\n');
    expect(droppableMappings(smaps)).toEqual([
      { start: 0x400000, end: 0xb6f000, path: '/usr/bin/node', rss: 5948 },
      { start: 0xb72000, end: 0x25fe000, path: '/usr/bin/node', rss: 16000 },
      { start: 0x7f0000a00000, end: 0x7f0000b00000, path: '/usr/lib/x86_64-linux-gnu/libc.so.6', rss: 700 },
    ]);
  });

  it("drops this process's pages, which come back as used: node goes on working", () => {
    const before = rssFileKb();
    const copied = copiedReadOnlyKb();
    expect(copied.size).toBeGreaterThan(0);
    const mine = droppableMappings(readFileSync('/proc/self/smaps', 'utf8'));
    expect(mine.some((m) => m.path === process.execPath)).toBe(true);
    const dropped = dropStartupPages();
    expect(dropped).toBeGreaterThan(4096);
    const after = rssFileKb();
    expect(after).toBeLessThan(before - 4096);
    // Code and data of node, V8, OpenSSL and zlib mapped back from the page cache as used.
    const data = Buffer.alloc(1 << 20, 'nbdd');
    expect(gunzipSync(gzipSync(data)).equals(data)).toBe(true);
    expect(createHash('sha256').update(data).digest('hex')).toHaveLength(64);
    expect(new Intl.NumberFormat('de-DE').format(1234567.5)).toBe('1.234.567,5');
    expect(JSON.parse(JSON.stringify({ a: [1, 2, 3] }))).toEqual({ a: [1, 2, 3] });
    // The copied pages of read-only file mappings (RELRO after relocation) were left in place.
    expect(copiedReadOnlyKb()).toEqual(copied);
  });
});
