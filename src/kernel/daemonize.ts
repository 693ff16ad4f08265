/**
 * Running `nbdd attach` as a daemon: the command re-executes itself in the foreground as a
 * detached child (new session, stdio to a log file) with an extra pipe on fd 3; the child writes
 * one JSON line there once the device is usable (or failed), and the parent relays it and exits.
 */
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, createWriteStream } from 'node:fs';
import { dirname } from 'node:path';
import { Errno, NbddError } from '../core/errors.js';

/** The fd number the child's readiness pipe has. */
export const READY_FD = 3;

export type Readiness =
  | { ok: true; device: string; index: number; name: string; pid: number; reattached: boolean; driver: 'nbd' | 'ublk'; metrics?: string }
  | { ok: false; errno: number; message: string };

/** Child side: reports readiness once on `fd` and closes it. */
export function reportReadiness(fd: number, message: Readiness): Promise<void> {
  const out = createWriteStream('', { fd, autoClose: true });
  return new Promise((resolve) => out.end(`${JSON.stringify(message)}\n`, () => resolve()));
}

/**
 * Parent side: starts `args` (the CLI arguments for the foreground child) detached, under
 * `wrapper` (a command that execs the rest, e.g. `unshare --mount --`) when given, with stdout
 * and stderr appended to `logFile`, and waits for its readiness line. Throws NbddError with the
 * child's own error, or with the log's tail when the child died without reporting.
 */
export async function spawnDaemon(args: string[], logFile: string, wrapper: string[] = []): Promise<Readiness & { ok: true }> {
  mkdirSync(dirname(logFile), { recursive: true });
  const log = openSync(logFile, 'a');
  const argv = [process.execPath, ...process.execArgv, process.argv[1]!, ...args];
  const [cmd, ...rest] = [...wrapper, ...argv];
  const child = spawn(cmd!, rest, {
    detached: true,
    stdio: ['ignore', log, log, 'pipe'],
    env: process.env,
  });
  closeSync(log);
  const pipe = child.stdio[READY_FD] as NodeJS.ReadableStream;
  let text = '';
  pipe.setEncoding('utf8');
  pipe.on('data', (d: string) => (text += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve) => pipe.once('end', () => resolve()));
  const line = text.split('\n')[0]!;
  if (!line) {
    const code = await exited;
    const tail = readFileSync(logFile, 'utf8').trim().split('\n').slice(-5).join('\n');
    throw new NbddError(Errno.EIO, `the daemon exited (status ${code}) before the device was ready; ${logFile}:\n${tail}`);
  }
  const ready = JSON.parse(line) as Readiness;
  if (!ready.ok) throw new NbddError(ready.errno, ready.message);
  child.unref();
  return ready;
}
