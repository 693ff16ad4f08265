/** Running real peers (qemu-img, nbdinfo, nbdcopy, …) from interop tests, without blocking. */
import { execFile, spawnSync } from 'node:child_process';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `cmd args`; resolves with its exit code and output (does not throw on failure). */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Like `run`, but throws with the output when the exit code is not 0. */
export async function runOk(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/**
 * Fails (never skips) when a tool the test drives is missing, naming the install command.
 * `pkg` is the Debian package that provides it.
 */
export function requireTools(tools: Record<string, string>): void {
  const missing = Object.entries(tools).filter(([tool]) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map(([, pkg]) => pkg))].join(' ');
    throw new Error(`missing ${missing.map(([t]) => t).join(', ')}: run 'bash scripts/install-test-deps.sh' (or apt-get install ${pkgs})`);
  }
}
