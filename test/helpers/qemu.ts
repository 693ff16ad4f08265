/**
 * Small helpers around qemu-img and qemu-io for the qcow2 tests: create images, run many qemu-io
 * commands in one process, convert to raw, check. Every helper fails with the install command
 * when qemu-utils is missing (through `requireTool`).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTool, run, runStatus } from './tools.js';

export function requireQemu(): void {
  requireTool('qemu-img');
  requireTool('qemu-io');
}

/** `qemu-img create -f qcow2 [-o opts] [-b backing -F fmt] path size`. */
export function qemuCreate(path: string, size: string | number, opts: string[] = [], backing?: { path: string; format: string }): void {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing.path, '-F', backing.format);
  args.push(path, String(size));
  run('qemu-img', args);
}

/** Runs all `commands` in one qemu-io process (`-c` each), on an image of format `format`. */
export function qemuIo(path: string, commands: string[], format = 'qcow2'): string {
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  args.push(path);
  return run('qemu-io', args);
}

/**
 * The guest contents of `path` as qemu sees them (`qemu-img convert -O raw`). `shared`: the image
 * is open for writing (by nbdd), so qemu must not take its locks (`-U`).
 */
export function qemuRaw(path: string, dir: string, format = 'qcow2', shared = false): Buffer {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}.img`);
  run('qemu-img', ['convert', ...(shared ? ['-U'] : []), '-f', format, '-O', 'raw', path, out]);
  return readFileSync(out);
}

export interface CheckResult {
  status: number;
  output: string;
}

/**
 * `qemu-img check`: status 0 clean, 1 errors, 2 corruption, 3 leaks only. `shared`: of an image
 * nbdd has open for writing (`-U`; nbdd takes QEMU's image locks). A process that has just died
 * may hold its locks a moment longer (an io_uring instance closes its files after the process
 * exits): a lock refusal is retried for up to 5 s.
 */
export function qemuCheck(path: string, shared = false): CheckResult {
  for (let attempt = 0; ; attempt++) {
    const r = runStatus('qemu-img', ['check', ...(shared ? ['-U'] : []), path]);
    if (attempt < 50 && /Failed to get .*lock/.test(r.stderr)) {
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
      continue;
    }
    return { status: r.status, output: r.stdout + r.stderr };
  }
}

/** `qemu-img compare` status: 0 equal, 1 different, >= 2 error. */
export function qemuCompare(a: string, b: string, formatA = 'qcow2', formatB = 'qcow2'): CheckResult {
  const r = runStatus('qemu-img', ['compare', '-f', formatA, '-F', formatB, a, b]);
  return { status: r.status, output: r.stdout + r.stderr };
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

export function qemuMap(path: string): MapEntry[] {
  return JSON.parse(run('qemu-img', ['map', '--output=json', path])) as MapEntry[];
}

export { prng } from './prng.js';
