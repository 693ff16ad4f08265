/**
 * Real peers for interop tests: checks that a tool exists (failing with the install command when it
 * does not: no silent skips), and runs `nbdd serve` as a child with a strict teardown.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const NBDD = resolve(import.meta.dirname, '../../bin/nbdd');

const PACKAGES: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdkit: 'nbdkit',
  'nbd-server': 'nbd-server',
  'nbd-client': 'nbd-client',
  fio: 'fio',
  'qemu-system-x86_64': 'qemu-system-x86',
};

/** Throws with the install command if `tool` is not on PATH. */
export function requireTool(tool: string): void {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${tool} is not installed: run 'apt-get install ${PACKAGES[tool] ?? tool}' (or scripts/install-test-deps.sh)`);
  }
}

export function tempDir(prefix = 'nbdd-test-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** Runs a command, returning stdout; throws with stderr on a non-zero exit. */
export function run(cmd: string, args: string[], options: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', input: options.input, env: options.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
  } catch (err) {
    const e = err as { status?: number; stderr?: string; stdout?: string };
    throw new Error(`${cmd} ${args.join(' ')} exited ${e.status}: ${e.stderr || e.stdout}`);
  }
}

/** Like `run` but returns the exit status and output instead of throwing. */
export function runStatus(cmd: string, args: string[], options: { input?: string } = {}): { status: number; stdout: string; stderr: string } {
  try {
    const stdout = execFileSync(cmd, args, { encoding: 'utf8', input: options.input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
    return { status: 0, stdout, stderr: '' };
  } catch (err) {
    const e = err as { status?: number; stderr?: string; stdout?: string };
    return { status: e.status ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

async function waitForSocket(path: string, child: ChildProcess, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`server exited early with status ${child.exitCode}`);
    if (existsSync(path)) {
      const ok = await new Promise<boolean>((r) => {
        const s = net.connect(path);
        s.once('connect', () => {
          s.destroy();
          r(true);
        });
        s.once('error', () => r(false));
      });
      if (ok) return;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no server on ${path} after ${ms} ms`);
}

export interface Served {
  uri: string;
  socket: string;
  child: ChildProcess;
  stderr: () => string;
  /** SIGTERM, and fail unless the server exits 0 within 10 s. */
  stop: () => Promise<void>;
}

/**
 * Starts `nbdd serve IMAGE --socket S ...args` and waits until it accepts connections. The socket
 * is in `dir`, else in a directory of its own that goes when the server exits.
 */
export async function serveNbdd(image: string, args: string[] = [], dir?: string): Promise<Served> {
  const d = dir ?? mkdtempSync(join(tmpdir(), 'nbdd-sock-'));
  const socket = join(d, `nbdd-${Math.random().toString(36).slice(2)}.sock`);
  const child = spawn(NBDD, ['serve', image, '--socket', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  if (!dir) child.once('exit', () => rmSync(d, { recursive: true, force: true }));
  let err = '';
  child.stderr!.on('data', (b) => (err += b));
  try {
    await waitForSocket(socket, child, 10_000);
  } catch (e) {
    child.kill('SIGKILL');
    throw new Error(`${(e as Error).message}\n${err}`);
  }
  const name = args.includes('--export-name') ? args[args.indexOf('--export-name') + 1]! : '';
  return {
    uri: `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    socket,
    child,
    stderr: () => err,
    stop: async () => {
      if (child.exitCode !== null) throw new Error(`server already exited with ${child.exitCode}: ${err}`);
      const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
      child.kill('SIGTERM');
      const code = await Promise.race([exited, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 10_000))]);
      if (code === 'timeout') {
        child.kill('SIGKILL');
        throw new Error(`nbdd did not exit within 10 s of SIGTERM\n${err}`);
      }
      if (code !== 0) throw new Error(`nbdd exited ${code} after SIGTERM\n${err}`);
    },
  };
}
