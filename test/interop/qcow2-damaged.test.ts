/**
 * Every damaged image of test/helpers/damage.ts (≥ 150 named mutations of a few healthy bases),
 * each its own test:
 *
 *   a. `describeQcow2` (what `nbdd info` shows) resolves, or rejects with nbdd's own NbddError;
 *   b. a read-only stack (`nbdd serve -r`) opens or refuses with an NbddError; opened, every
 *      256 KiB read of the disk and block status resolves or rejects with an NbddError (never
 *      hangs); the file is unchanged by a byte;
 *   c. `qemu-img check` records qemu's view; a writable stack refuses (file unchanged) or takes
 *      writes at the start, a partial cluster, the middle and the last cluster; every acknowledged
 *      write reads back after a read-only reopen, and qemu finds no more corruption than before.
 *   d. a dozen cases through the real daemon (`nbdd serve`, read-only and writable) read and
 *      written over NBD by qemu-io / nbdcopy: the daemon survives and exits 0 on SIGTERM.
 *
 * At the end a table is printed, and written as JSON to $NBDD_DAMAGE_REPORT when set.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeQcow2 } from '../../src/backends/qcow2/describe.js';
import { NbddError } from '../../src/core/errors.js';
import { openStack, type DeviceStack } from '../../src/runtime/stack.js';
import { BASES, CASES, buildCase, describeCheck, makeBases, parse, qemuCheckJson, sha256File, type BaseName, type DamagedCase } from '../helpers/damage.js';
import { prng } from '../helpers/prng.js';
import { requireQemu } from '../helpers/qemu.js';
import { requireTool, runStatus, serveNbdd, tempDir } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const READ_CHUNK = 256 * KiB;
/** Reads in flight at once (the queue merges neighbours of one turn). */
const READ_DEPTH = 8;
/** Disks larger than this are read at both ends only. */
const READ_CAP = 64 * MiB;
const BLOCK_STATUS_CALLS = 64;
/** A request, open or close that has not settled by then counts as hung. */
const HANG_MS = 15_000;

/** Phrasing of errors that escaped from Node or the runtime rather than being nbdd's own. */
const FOREIGN = /ERR_[A-Z_]{3,}|out of range|Invalid array length|Cannot read propert|Cannot set propert|is not a function|is not iterable|is not defined|\bundefined\b|\bNaN\b|Maximum call stack|Invalid typed array|internal assertion failed|Array buffer allocation failed/;

interface Row {
  name: string;
  category: string;
  base: BaseName;
  info: string;
  ro: string;
  rw: string;
  qemuBefore: string;
  qemuAfter: string;
  /** Informational: the read-only reads against qemu's reads of the same chunks. */
  vsQemu: string;
  readsDiffer: number;
  nbddEioQemuReads: number;
  /** Informational: 256 KiB reads that failed in a batch (merged with a bad neighbour) but read fine alone. */
  mergedCollateral: number;
  /** Bytes of the file unchanged by the read-only steps, and by a refused writable open. */
  unchanged: boolean;
  problems: string[];
  ms: number;
}

let dir: ReturnType<typeof tempDir>;
let bases: Record<BaseName, string>;
const baseHashes = new Map<string, string>();
const clusterSizes = {} as Record<BaseName, number>;
const rows: Row[] = [];

beforeAll(() => {
  requireQemu();
  requireTool('nbdinfo');
  requireTool('nbdcopy');
  dir = tempDir('nbdd-qcow2-damaged-');
  bases = makeBases(join(dir.path));
  for (const b of BASES) clusterSizes[b] = parse(readFileSync(bases[b])).cs;
  for (const p of [...Object.values(bases), join(dir.path, 'backing-lower.qcow2')]) baseHashes.set(p, sha256File(p));
});

afterAll(() => {
  if (rows.length > 0) report(rows);
  dir?.remove();
});

/* ------------------------------------------------------------------ helpers */

class Hung extends Error {}

/** `p`, or a rejection with `Hung` when it has not settled within HANG_MS. */
function timed<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Hung(`${what} did not settle within ${HANG_MS / 1000} s`)), HANG_MS);
  });
  return Promise.race([p, hang]).finally(() => clearTimeout(timer));
}

function msg(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return dir ? text.replaceAll(`${dir.path}/cases/`, '').replaceAll(dir.path, 'TMP') : text;
}

function short(s: string, n = 110): string {
  const one = s.replace(/\s+/g, ' ');
  return one.length > n ? `${one.slice(0, n - 1)}…` : one;
}

/** Records a problem unless `err` is an NbddError with nbdd's own message. */
function judge(err: unknown, what: string, problems: string[]): void {
  if (err instanceof Hung) problems.push(`${what}: hung (${err.message})`);
  else if (!(err instanceof NbddError)) problems.push(`${what}: threw ${(err as Error)?.constructor?.name ?? typeof err}, not NbddError: ${short(msg(err))}`);
  else if (FOREIGN.test(err.message)) problems.push(`${what}: NbddError with a foreign message: ${short(err.message)}`);
}

/** The ranges a read-only pass reads: all of the disk in READ_CHUNK pieces (both ends of a huge one). */
function readRanges(size: number): [number, number][] {
  const spans: [number, number][] = size <= READ_CAP ? [[0, size]] : [[0, READ_CAP / 2], [size - READ_CAP / 2, size]];
  const out: [number, number][] = [];
  for (const [start, end] of spans) for (let at = start; at < end; at += READ_CHUNK) out.push([at, Math.min(READ_CHUNK, end - at)]);
  return out;
}

/** Reads `ranges` READ_DEPTH at a time; returns what each read returned (null: it failed). */
async function readAll(stack: DeviceStack, ranges: [number, number][], what: string, problems: string[]): Promise<(Buffer | null)[]> {
  const out: (Buffer | null)[] = ranges.map(() => null);
  for (let i = 0; i < ranges.length; i += READ_DEPTH) {
    const batch = ranges.slice(i, i + READ_DEPTH);
    const results = await Promise.allSettled(batch.map(([at, n]) => timed(stack.queue.read(at, n), `${what} read at ${at}`)));
    results.forEach((r, k) => {
      if (r.status === 'fulfilled') {
        if (r.value.length === batch[k]![1]) out[i + k] = Buffer.from(r.value);
        else problems.push(`${what} read at ${batch[k]![0]} returned ${r.value.length} bytes for ${batch[k]![1]}`);
      } else {
        judge(r.reason, `${what} read at ${batch[k]![0]}`, problems);
      }
    });
    if (results.some((r) => r.status === 'rejected' && r.reason instanceof Hung)) break;
  }
  return out;
}

/**
 * The guest contents as qemu reads them, per READ_CHUNK (null where qemu's read fails), or null
 * when qemu cannot open the image. A failing range is split in halves until the chunks that fail
 * are found (`qemu-img convert` of a raw offset/size window over the qcow2 node).
 */
function qemuChunks(path: string, size: number): (Buffer | null)[] | null {
  const n = Math.ceil(size / READ_CHUNK);
  const out: (Buffer | null)[] = new Array(n).fill(null);
  const target = `${path}.qemu.raw`;
  const convert = (source: string): { ok: boolean; err: string } => {
    try {
      execFileSync('qemu-img', ['convert', '-O', 'raw', source, target], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
      return { ok: true, err: '' };
    } catch (err) {
      return { ok: false, err: String((err as { stderr?: Buffer }).stderr ?? err) };
    }
  };
  const window = (lo: number, hi: number): string =>
    `json:${JSON.stringify({ driver: 'raw', offset: lo * READ_CHUNK, size: Math.min(size, hi * READ_CHUNK) - lo * READ_CHUNK, file: { driver: 'qcow2', file: { driver: 'file', filename: path } } })}`;
  const take = (lo: number): void => {
    const raw = readFileSync(target);
    for (let k = 0; k * READ_CHUNK < raw.length; k++) out[lo + k] = raw.subarray(k * READ_CHUNK, (k + 1) * READ_CHUNK);
  };
  const whole = convert(`json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path } })}`);
  if (whole.ok) {
    take(0);
    rmSync(target, { force: true });
    return out;
  }
  if (!/error while reading/i.test(whole.err)) return null; // it did not open
  const bisect = (lo: number, hi: number): void => {
    if (convert(window(lo, hi)).ok) take(lo);
    else if (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      bisect(lo, mid);
      bisect(mid, hi);
    }
  };
  bisect(0, n);
  rmSync(target, { force: true });
  return out;
}

/**
 * Reads again, one at a time, the chunks whose (possibly merged) read failed; returns how many
 * read fine alone (EIO given to a good range only because the queue merged it with a bad one).
 */
async function rereadFailed(stack: DeviceStack, ranges: [number, number][], chunks: (Buffer | null)[], problems: string[]): Promise<number> {
  let fine = 0;
  for (let k = 0; k < chunks.length; k++) {
    if (chunks[k]) continue;
    const [at, n] = ranges[k]!;
    try {
      chunks[k] = Buffer.from(await timed(stack.queue.read(at, n), `single read at ${at}`));
      fine++;
    } catch (err) {
      judge(err, `single read at ${at}`, problems);
      if (err instanceof Hung) break;
    }
  }
  return fine;
}

/** nbdd's reads against qemu's, chunk by chunk (qemu's disk may be shorter: it rounds the size down to 512 B). */
function compareWithQemu(nbdd: (Buffer | null)[], qemu: (Buffer | null)[] | null): { summary: string; differ: number; nbddFails: number } {
  if (!qemu) return { summary: 'qemu cannot open', differ: 0, nbddFails: 0 };
  let differ = 0;
  let nbddFails = 0;
  let qemuFails = 0;
  let shorter = 0;
  nbdd.forEach((mine, k) => {
    const theirs = qemu[k] ?? null;
    if (mine && theirs) {
      if (theirs.length < mine.length) shorter += mine.length - theirs.length;
      if (!mine.subarray(0, theirs.length).equals(theirs)) differ++;
    } else if (!mine && theirs) nbddFails++;
    else if (mine && !theirs) qemuFails++;
  });
  const parts = [
    differ && `${differ} chunk(s) differ`,
    nbddFails && `nbdd EIO where qemu reads: ${nbddFails}`,
    qemuFails && `qemu EIO where nbdd reads: ${qemuFails}`,
    shorter && `qemu's disk is ${shorter} B shorter`,
  ].filter(Boolean);
  return { summary: parts.length ? parts.join(', ') : 'same', differ, nbddFails };
}

/** Block status from the start of the disk, at most BLOCK_STATUS_CALLS calls; returns the failure count. */
async function blockStatusAll(stack: DeviceStack, problems: string[]): Promise<number> {
  const size = Math.min(stack.queue.size, READ_CAP);
  let at = 0;
  for (let calls = 0; at < size && calls < BLOCK_STATUS_CALLS; calls++) {
    try {
      const extents = await timed(stack.queue.blockStatus(at, size - at), `block status at ${at}`);
      const n = extents.reduce((s, e) => s + e.length, 0);
      if (n <= 0) {
        problems.push(`block status at ${at} returned no extent`);
        return 1;
      }
      at += n;
    } catch (err) {
      judge(err, `block status at ${at}`, problems);
      return 1;
    }
  }
  return 0;
}

async function closeStack(stack: DeviceStack, what: string, problems: string[]): Promise<void> {
  try {
    await timed(stack.close(), `${what} close`);
  } catch (err) {
    judge(err, `${what} close`, problems);
  }
}

interface PlannedWrite {
  offset: number;
  data: Buffer;
}

/** Distinct patterns at the start, inside one cluster (unaligned), across the middle and at the end. */
function plannedWrites(size: number, cs: number): PlannedWrite[] {
  const mid = Math.floor(size / 2 / cs) * cs - 4 * KiB;
  const wanted: [number, number][] = [
    [0, 4 * KiB],
    [Math.max(cs, 8 * KiB) + 1000, 3000],
    [mid, Math.max(2 * cs, 8 * KiB)],
    [size - 4 * KiB, 4 * KiB],
  ];
  const out: PlannedWrite[] = [];
  let end = 0;
  wanted.forEach(([offset, length], k) => {
    if (offset < end || offset + length > size || length <= 0) return;
    const rnd = prng(1000 + k);
    const data = Buffer.alloc(length);
    for (let i = 0; i < length; i++) data[i] = Math.floor(rnd() * 256);
    out.push({ offset, data });
    end = offset + length;
  });
  return out;
}

/* ------------------------------------------------------------------ one case */

async function runCase(c: DamagedCase): Promise<Row> {
  const t0 = Date.now();
  const path = buildCase(c, bases, join(dir.path, 'cases'));
  const sha = sha256File(path);
  const problems: string[] = [];
  const row: Row = { name: c.name, category: c.category, base: c.base, info: '', ro: '', rw: '', qemuBefore: '', qemuAfter: '', vsQemu: '', readsDiffer: 0, nbddEioQemuReads: 0, mergedCollateral: 0, unchanged: true, problems, ms: 0 };

  // a. info
  try {
    await timed(describeQcow2(path), 'describeQcow2');
    row.info = 'ok';
  } catch (err) {
    judge(err, 'info', problems);
    row.info = `refused: ${short(msg(err), 90)}`;
  }

  // b. read-only serve
  let roOpened = false;
  let ro: DeviceStack | null = null;
  try {
    ro = await timed(openStack(path, { readOnly: true }), 'read-only open');
  } catch (err) {
    judge(err, 'read-only open', problems);
    row.ro = `refused: ${short(msg(err), 90)}`;
  }
  if (ro) {
    roOpened = true;
    const size = ro.queue.size;
    const ranges = readRanges(size);
    const chunks = await readAll(ro, ranges, 'read-only', problems);
    const failed = chunks.filter((b) => !b).length;
    row.mergedCollateral = await rereadFailed(ro, ranges, chunks, problems);
    const bsFailed = await blockStatusAll(ro, problems);
    await closeStack(ro, 'read-only', problems);
    const alone = row.mergedCollateral ? ` (${row.mergedCollateral} fine alone)` : '';
    row.ro = `opened, reads ${chunks.length - failed} ok${failed ? ` / ${failed} EIO${alone}` : ''}${bsFailed ? ', block status failed' : ''}`;
    if (size <= READ_CAP) {
      const vs = compareWithQemu(chunks, qemuChunks(path, size));
      row.vsQemu = vs.summary;
      row.readsDiffer = vs.differ;
      row.nbddEioQemuReads = vs.nbddFails;
      if (c.category === 'control' && vs.summary !== 'same') problems.push(`healthy image: nbdd and qemu read differently (${vs.summary})`);
    }
  }
  if (sha256File(path) !== sha) {
    row.unchanged = false;
    problems.push('the read-only steps changed the file');
  }

  // c. writable serve with writes
  const before = qemuCheckJson(path);
  row.qemuBefore = describeCheck(before);
  const current = sha256File(path);
  let rw: DeviceStack | null = null;
  try {
    rw = await timed(openStack(path, {}), 'writable open');
  } catch (err) {
    judge(err, 'writable open', problems);
    row.rw = `refused: ${short(msg(err), 90)}`;
    if (sha256File(path) !== current) {
      row.unchanged = false;
      problems.push('a refused writable open changed the file');
    }
  }
  if (rw) {
    const acked: PlannedWrite[] = [];
    const writes = plannedWrites(rw.queue.size, clusterSizes[c.base]);
    for (const w of writes) {
      try {
        await timed(rw.queue.write(w.offset, w.data), `write at ${w.offset}`);
        acked.push(w);
      } catch (err) {
        judge(err, `write at ${w.offset}`, problems);
        if (err instanceof Hung) break;
      }
    }
    let flushed = 'flushed';
    try {
      await timed(rw.queue.flush(), 'flush');
    } catch (err) {
      judge(err, 'flush', problems);
      flushed = `flush failed: ${short(msg(err), 60)}`;
    }
    await closeStack(rw, 'writable', problems);
    const lost = await verifyWrites(path, acked, roOpened, problems);
    const after = qemuCheckJson(path);
    row.qemuAfter = describeCheck(after);
    if (before.completed && !after.completed) problems.push(`qemu-img check ran before nbdd wrote, not after: ${after.error}`);
    if (before.completed && after.completed && after.corruptions > before.corruptions) {
      problems.push(`qemu-img check: corruptions ${before.corruptions} -> ${after.corruptions} after nbdd wrote`);
    }
    row.rw = `accepted, writes ${acked.length}/${writes.length} ok${lost ? ` (${lost} not read back)` : ''}, ${flushed}, qemu ${before.completed ? before.corruptions : '?'}→${after.completed ? after.corruptions : '?'}`;
  }
  row.ms = Date.now() - t0;
  return row;
}

/** Reopens read-only and reads every acknowledged write back; returns how many did not read back. */
async function verifyWrites(path: string, acked: PlannedWrite[], roOpened: boolean, problems: string[]): Promise<number> {
  let stack: DeviceStack;
  try {
    stack = await timed(openStack(path, { readOnly: true }), 'read-only reopen');
  } catch (err) {
    judge(err, 'read-only reopen', problems);
    if (acked.length > 0 || roOpened) problems.push(`after ${acked.length} acknowledged write(s) the image no longer opens read-only: ${short(msg(err))}`);
    return acked.length;
  }
  let lost = 0;
  for (const w of acked) {
    try {
      const got = await timed(stack.queue.read(w.offset, w.data.length), `read back at ${w.offset}`);
      if (!got.equals(w.data)) {
        lost++;
        let first = 0;
        while (first < got.length && got[first] === w.data[first]) first++;
        problems.push(`acknowledged write at ${w.offset} (${w.data.length} B) reads back different from byte ${first}`);
      }
    } catch (err) {
      lost++;
      judge(err, `read back at ${w.offset}`, problems);
      problems.push(`acknowledged write at ${w.offset} is unreadable: ${short(msg(err))}`);
    }
  }
  await closeStack(stack, 'read-only reopen', problems);
  return lost;
}

/* ------------------------------------------------------------------ report */

function report(all: Row[]): void {
  const cols: [string, (r: Row) => string, number][] = [
    ['case', (r) => r.name, 46],
    ['info', (r) => r.info, 28],
    ['read-only', (r) => r.ro, 34],
    ['writable', (r) => r.rw, 44],
    ['qemu before', (r) => r.qemuBefore, 24],
    ['reads vs qemu', (r) => r.vsQemu, 30],
    ['same', (r) => (r.unchanged ? 'yes' : 'NO'), 4],
    ['problems', (r) => (r.problems.length ? `${r.problems.length}: ${r.problems[0]}` : ''), 80],
  ];
  const cell = (s: string, w: number): string => (s.length > w ? `${s.slice(0, w - 1)}…` : s.padEnd(w));
  const lines = [cols.map(([h, , w]) => cell(h, w)).join(' | ')];
  for (const r of all) lines.push(cols.map(([, f, w]) => cell(f(r), w)).join(' | '));
  const failing = all.filter((r) => r.problems.length > 0);
  const followQemu = all.filter((r) => r.qemuBefore === 'clean' && [r.info, r.ro, r.rw].some((s) => s.startsWith('refused')));
  lines.push('', `${all.length} cases, ${failing.length} with problems, ${all.reduce((s, r) => s + r.ms, 0)} ms in cases`);
  lines.push('', 'qemu-img check finds these clean, nbdd refuses them (info / read-only / writable):');
  for (const r of followQemu) lines.push(`  ${r.name}: ${[r.info, r.ro, r.rw].find((s) => s.startsWith('refused'))}`);
  const eio = all.filter((r) => r.nbddEioQemuReads > 0);
  lines.push('', 'nbdd fails reads that qemu serves (informational):');
  for (const r of eio) lines.push(`  ${r.name}: ${r.vsQemu}`);
  const collateral = all.filter((r) => r.mergedCollateral > 0);
  lines.push('', `reads that failed in a batch but succeed alone (the queue merged them with a failing neighbour): ${collateral.length} cases, ${collateral.reduce((s, r) => s + r.mergedCollateral, 0)} reads`);
  const differ = all.filter((r) => r.readsDiffer > 0);
  lines.push('', 'nbdd and qemu both read, but different bytes (informational):');
  for (const r of differ) lines.push(`  ${r.name}: ${r.vsQemu}`);
  console.log(lines.join('\n'));
  const out = process.env['NBDD_DAMAGE_REPORT'];
  if (out) {
    const names = (rs: Row[]): string[] => rs.map((r) => r.name);
    writeFileSync(out, JSON.stringify({ cases: all, failing: names(failing), qemuCleanNbddRefuses: names(followQemu), nbddEioWhereQemuReads: names(eio), readsDifferFromQemu: names(differ), mergedReadCollateral: names(collateral) }, null, 2));
  }
}

/* ------------------------------------------------------------------ tests */

describe('damaged qcow2 images (in process)', () => {
  it('has at least 150 cases in every category', () => {
    expect(CASES.length).toBeGreaterThanOrEqual(150);
    const categories = new Set(CASES.map((c) => c.category));
    for (const cat of ['header', 'l1', 'l2', 'refcount', 'compressed', 'extension', 'backing', 'bitmap', 'truncated', 'flags']) expect(categories).toContain(cat);
  });

  for (const c of CASES) {
    it(c.name, async () => {
      const row = await runCase(c);
      rows.push(row);
      expect(row.problems, `${c.name}:\n  ${row.problems.join('\n  ')}`).toEqual([]);
    });
  }

  it('left the base images (and the backing file) unchanged', () => {
    for (const [p, h] of baseHashes) expect(sha256File(p), p).toBe(h);
  });
});

/** Representative cases through the real daemon. */
const CLI_CASES = [
  'control.v3',
  'l2.past-eof',
  'l2.shared-data',
  'compressed.garbage-data',
  'refcount.block-zeroed',
  'refcount.zero-for-header',
  'l1.at-refcount-table',
  'header.l1_size-0',
  'backing.directory',
  'bitmap.table-entry-past-eof',
  'truncated.inside-last-data',
  'extension.no-end-marker-fill-cluster',
];

/** Fails on output that shows a crash rather than a refusal. */
const CRASH = /\n\s+at |TypeError|RangeError|ReferenceError|Unhandled|uncaught/i;

describe('damaged qcow2 images through nbdd serve', () => {
  it.each(CLI_CASES)('%s', async (name) => {
    const c = CASES.find((x) => x.name === name);
    expect(c, name).toBeDefined();
    for (const writable of [false, true]) {
      const path = buildCase(c!, bases, join(dir.path, writable ? 'cli-rw' : 'cli-ro'));
      let srv: Awaited<ReturnType<typeof serveNbdd>>;
      try {
        srv = await serveNbdd(path, writable ? [] : ['-r'], dir.path);
      } catch (err) {
        // Refused at start: a message, not a crash.
        expect(msg(err)).toMatch(/server exited early with status [1-9]/);
        expect(msg(err)).not.toMatch(CRASH);
        continue;
      }
      try {
        const sizeOut = runStatus('nbdinfo', ['--size', srv.uri]);
        expect(sizeOut.status, sizeOut.stderr).toBe(0);
        const size = Math.min(Number(sizeOut.stdout.trim()), READ_CAP);
        if (writable) {
          runStatus('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', '-c', `write -P 0x5b ${Math.max(0, size - 4096)} 4k`, '-c', 'write -P 0x5c 70000 3000', '-c', 'flush', srv.uri]);
        }
        runStatus('qemu-io', ['-f', 'raw', '-c', `read 0 ${size}`, srv.uri]);
        runStatus('nbdcopy', [srv.uri, 'null:']);
        expect(srv.child.exitCode, srv.stderr()).toBeNull();
        const again = runStatus('nbdinfo', ['--size', srv.uri]);
        expect(again.status, `daemon no longer answers after the reads: ${again.stderr}\n${srv.stderr()}`).toBe(0);
        expect(srv.stderr()).not.toMatch(CRASH);
      } finally {
        await srv.stop();
      }
    }
  });
});
