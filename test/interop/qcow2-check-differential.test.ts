/**
 * `checkQcow2` (nbdd check) against `qemu-img check` on every damaged image of
 * test/helpers/damage.ts that qemu can check (exit 0, 2 or 3):
 *
 *   - nbdd reports corruption exactly when qemu does; where nbdd reports corruption and qemu none,
 *     it must be a metadata overlap or a zero flag on a v2 image (which qemu's own reads refuse:
 *     "Zero cluster entry found in pre-v3 image"), and the case is listed;
 *   - where nbdd cannot even parse the header (it throws "corrupt qcow2 image: …", `nbdd check`
 *     exits 1), qemu must find the image corrupt too; the case is listed;
 *   - nbdd reports leaks when qemu reports leaks and no corruption;
 *   - `checkQcow2(copy, { repair: 'all' })`: when nbdd then finds the copy consistent, qemu-img
 *     check finds it clean too, and every guest byte qemu could read before the repair reads the
 *     same after it.
 *
 * Cases qemu cannot check are skipped (recorded as such). A table is printed at the end, and
 * written as JSON to $NBDD_CHECK_REPORT when set.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkQcow2, type CheckReport } from '../../src/backends/qcow2/check/index.js';
import { NbddError } from '../../src/core/errors.js';
import { CASES, buildCase, describeCheck, makeBases, qemuCheckJson, type BaseName } from '../helpers/damage.js';
import { requireQemu } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tools.js';

/** Granularity of the guest-byte comparison (a failing range is split down to this). */
const CHUNK = 64 * 1024;
/** Disks larger than this are not compared byte for byte (a damaged size field). */
const COMPARE_CAP = 64 * 1024 * 1024;
/**
 * What nbdd may report as corruption where qemu reports none: a cluster used as two things, or a
 * zero flag on v2 (qemu's check misses it, its reads refuse it).
 */
const STRICTER = /overlap|is both|used as both|zero flag set, which version 2 images do not have/i;

interface Row {
  name: string;
  qemu: string;
  nbdd: string;
  repaired: string;
  problems: string[];
}

let dir: ReturnType<typeof tempDir>;
let bases: Record<BaseName, string>;
const rows: Row[] = [];
const stricter: { name: string; messages: string[] }[] = [];
const refused: { name: string; message: string }[] = [];

beforeAll(() => {
  requireQemu();
  dir = tempDir('nbdd-qcow2-check-diff-');
  bases = makeBases(dir.path);
});

afterAll(() => {
  if (rows.length > 0) report();
  dir?.remove();
});

function msg(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function summary(r: CheckReport): string {
  return `corrupt ${r.corruptions}, leaks ${r.leaks}${r.checkErrors ? `, check errors ${r.checkErrors}` : ''}`;
}

function virtualSize(path: string): number | null {
  try {
    return (JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 })) as { 'virtual-size': number })['virtual-size'];
  } catch {
    return null;
  }
}

/**
 * The guest bytes qemu can read, per CHUNK (null where the read fails): `qemu-img convert` of the
 * whole disk, and where that fails, of raw offset/size windows split in halves down to one chunk.
 */
function qemuGuest(path: string, size: number): (Buffer | null)[] {
  const n = Math.ceil(size / CHUNK);
  const out: (Buffer | null)[] = new Array(n).fill(null);
  const target = `${path}.raw`;
  const qcow2 = { driver: 'qcow2', file: { driver: 'file', filename: path } };
  const convert = (lo: number, hi: number): boolean => {
    const source = lo === 0 && hi === n ? qcow2 : { driver: 'raw', offset: lo * CHUNK, size: Math.min(size, hi * CHUNK) - lo * CHUNK, file: qcow2 };
    try {
      execFileSync('qemu-img', ['convert', '-O', 'raw', `json:${JSON.stringify(source)}`, target], { stdio: 'ignore', timeout: 20_000 });
    } catch {
      return false;
    }
    const raw = readFileSync(target);
    for (let k = 0; k * CHUNK < raw.length; k++) out[lo + k] = raw.subarray(k * CHUNK, (k + 1) * CHUNK);
    return true;
  };
  const bisect = (lo: number, hi: number): void => {
    if (convert(lo, hi) || hi - lo <= 1) return;
    const mid = (lo + hi) >> 1;
    bisect(lo, mid);
    bisect(mid, hi);
  };
  bisect(0, n);
  rmSync(target, { force: true });
  return out;
}

function report(): void {
  const cell = (s: string, w: number): string => (s.length > w ? `${s.slice(0, w - 1)}…` : s.padEnd(w));
  const lines = [`${cell('case', 46)} | ${cell('qemu-img check', 26)} | ${cell('nbdd check', 26)} | ${cell('after repair', 40)} | problems`];
  for (const r of rows) lines.push(`${cell(r.name, 46)} | ${cell(r.qemu, 26)} | ${cell(r.nbdd, 26)} | ${cell(r.repaired, 40)} | ${r.problems.length ? `${r.problems.length}: ${r.problems[0]}` : ''}`);
  lines.push('', `${rows.length} cases, ${rows.filter((r) => r.qemu.startsWith('no check')).length} not checkable by qemu, ${rows.filter((r) => r.problems.length).length} with problems`);
  lines.push('', 'nbdd cannot parse the header (exit 1) where qemu finds corruption:');
  for (const r of refused) lines.push(`  ${r.name}: ${r.message}`);
  lines.push('', 'nbdd reports corruption where qemu reports none (allowed for metadata overlaps and v2 zero flags only):');
  for (const s of stricter) lines.push(`  ${s.name}: ${s.messages.slice(0, 2).join(' | ')}`);
  console.log(lines.join('\n'));
  const out = process.env['NBDD_CHECK_REPORT'];
  if (out) writeFileSync(out, JSON.stringify({ cases: rows, stricter, refused, failing: rows.filter((r) => r.problems.length).map((r) => r.name) }, null, 2));
}

describe('nbdd check against qemu-img check on damaged images', () => {
  for (const c of CASES) {
    it(c.name, async () => {
      const path = buildCase(c, bases, join(dir.path, 'cases'));
      const q = qemuCheckJson(path);
      const row: Row = { name: c.name, qemu: describeCheck(q), nbdd: '', repaired: '', problems: [] };
      rows.push(row);
      if (!q.completed) return; // qemu cannot check it: nothing to compare against
      const problems = row.problems;

      let nb: CheckReport;
      try {
        nb = await checkQcow2(path);
      } catch (err) {
        row.nbdd = `threw: ${msg(err)}`;
        if (err instanceof NbddError && /^corrupt qcow2 image: /.test(err.message) && q.corruptions > 0) {
          refused.push({ name: c.name, message: err.message });
          return; // both call it corrupt; nbdd's scan cannot start on a header it cannot parse
        }
        problems.push(`qemu-img check completed (exit ${q.status}) but checkQcow2 threw: ${msg(err)}`);
        expect(problems).toEqual([]);
        return;
      }
      row.nbdd = summary(nb);
      if (nb.checkErrors > 0) problems.push(`nbdd check had ${nb.checkErrors} check error(s) where qemu completed: ${nb.messages.slice(0, 2).join(' | ')}`);
      if (q.corruptions > 0 && nb.corruptions === 0) problems.push(`qemu finds ${q.corruptions} corruption(s), nbdd none`);
      if (q.corruptions === 0 && nb.corruptions > 0) {
        stricter.push({ name: c.name, messages: nb.messages });
        if (!nb.messages.some((m) => STRICTER.test(m))) problems.push(`nbdd finds ${nb.corruptions} corruption(s) where qemu finds none, not a metadata overlap or a v2 zero flag: ${nb.messages.slice(0, 2).join(' | ')}`);
      }
      if (q.leaks > 0 && q.corruptions === 0 && nb.leaks === 0) problems.push(`qemu finds ${q.leaks} leak(s) and no corruption, nbdd no leak`);

      // Repair a copy.
      const copy = join(dir.path, 'cases', `${c.name}.repair.qcow2`);
      copyFileSync(path, copy);
      const size = virtualSize(copy);
      const before = size !== null && size <= COMPARE_CAP ? qemuGuest(copy, size) : null;
      try {
        const fixed = await checkQcow2(copy, { repair: 'all' });
        const again = await checkQcow2(copy);
        row.repaired = `fixed ${fixed.corruptionsFixed}+${fixed.leaksFixed}, then ${summary(again)}`;
        if (again.corruptions === 0 && again.leaks === 0 && again.checkErrors === 0) {
          const qa = qemuCheckJson(copy);
          row.repaired += `; qemu ${describeCheck(qa)}`;
          if (!qa.completed || qa.corruptions > 0 || qa.leaks > 0) problems.push(`nbdd repaired it to consistent, qemu-img check says: ${describeCheck(qa)}`);
          if (before && size !== null) {
            const after = qemuGuest(copy, size);
            const changed = before.map((b, k) => (b && !(after[k] && after[k]!.equals(b)) ? k * CHUNK : -1)).filter((at) => at >= 0);
            if (changed.length) problems.push(`repair changed or lost guest bytes qemu could read before, at ${changed.slice(0, 4).map((at) => `0x${at.toString(16)}`).join(', ')}${changed.length > 4 ? ` (+${changed.length - 4})` : ''}`);
          }
        }
      } catch (err) {
        row.repaired = `threw: ${msg(err)}`;
        problems.push(`checkQcow2 --repair all threw: ${msg(err)}`);
      } finally {
        rmSync(copy, { force: true });
      }
      expect(problems, `${c.name}:\n  ${problems.join('\n  ')}`).toEqual([]);
    });
  }
});
