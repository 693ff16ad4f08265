/**
 * Node's start-up pages handed back once a daemon has started (docs/performance.md, "Node's
 * start-up pages").
 *
 * Starting node and loading nbdd touches 43 MiB of file pages — the node binary's text and
 * read-only data, and its libraries — and they stay mapped, counted in the resident set, for the
 * life of the process: the dynamic linker's symbol tables (6.5 MiB of `.dynsym`/`.dynstr`, read
 * while libraries and addons bind), the snapshot deserializer, the bootstrap, the module loader
 * and compiler that ran once. Serving needs about 22 MiB of them.
 *
 * `dropStartupPages` unmaps the pages of every private, read-only file mapping that holds no
 * anonymous (copied-on-write) page, with MADV_DONTNEED. Such a mapping's pages are the file's own
 * bytes: the next access maps them again from the page cache, so the code that serving uses comes
 * back within its first requests, and what only start-up used stays out. The page cache keeps the
 * pages (shared with any other node process; unmapped, they are the first that reclaim takes), so
 * this lowers nbdd's resident set, not the host's page cache or a cgroup's charge for it.
 *
 * Mappings with a copied page (RELRO after relocation, a breakpoint) are left alone: MADV_DONTNEED
 * would put the file's bytes back under them.
 */
import { readFileSync } from 'node:fs';
import { logger } from '../core/log.js';
import { messageOf } from '../core/errors.js';
import { MADV_DONTNEED, madvise } from './libc.js';

const log = logger('sys');

export interface Mapping {
  start: number;
  end: number;
  path: string;
  /** Resident kB, as smaps says. */
  rss: number;
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) [0-9a-f]+ \S+ \d+\s*(.*)$/;
const FIELD = /^(\w+):\s+(\d+) kB$/;

/**
 * The mappings of `smaps` (the text of /proc/PID/smaps) whose resident pages can be dropped: private,
 * read-only (with or without execute), backed by a file that still exists, with resident pages
 * and no anonymous or locked ones.
 */
export function droppableMappings(smaps: string): Mapping[] {
  const out: Mapping[] = [];
  let cur: (Mapping & { ok: boolean }) | null = null;
  const finish = (): void => {
    if (cur?.ok && cur.rss > 0) out.push({ start: cur.start, end: cur.end, path: cur.path, rss: cur.rss });
  };
  for (const line of smaps.split('\n')) {
    const h = HEADER.exec(line);
    if (h) {
      finish();
      const [, lo = '', hi = '', perms, path = ''] = h;
      const ok = (perms === 'r--p' || perms === 'r-xp') && path.startsWith('/') && !path.endsWith(' (deleted)');
      cur = { start: parseInt(lo, 16), end: parseInt(hi, 16), path, rss: 0, ok };
      continue;
    }
    const f = cur && FIELD.exec(line);
    if (!f || !cur) continue;
    const kb = Number(f[2]);
    if (f[1] === 'Rss') cur.rss = kb;
    else if ((f[1] === 'Anonymous' || f[1] === 'Locked') && kb > 0) cur.ok = false;
  }
  finish();
  return out;
}

/**
 * Drops this process's resident pages of droppable file mappings (see above). Returns the kB they
 * held; never throws (a failure is logged and leaves the pages where they were).
 */
export function dropStartupPages(): number {
  let dropped = 0;
  try {
    for (const m of droppableMappings(readFileSync('/proc/self/smaps', 'utf8'))) {
      madvise(m.start, m.end, MADV_DONTNEED);
      dropped += m.rss;
    }
    log.debug(`start-up pages dropped: ${(dropped / 1024).toFixed(1)} MiB of file mappings`);
  } catch (err) {
    log.debug(`start-up pages kept: ${messageOf(err)}`);
  }
  return dropped;
}
