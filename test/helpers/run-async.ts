/**
 * Running real peers (nbdinfo, nbdcopy, qemu-io, …) without blocking the event loop, for tests
 * whose server runs in the test process itself (tools.ts's synchronous `run` would deadlock them).
 */
import { execFile } from 'node:child_process';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `cmd args`; resolves with its exit code and output (does not throw on failure). */
export function runAsync(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Like `run`, but throws with the output when the exit code is not 0. */
export async function runAsyncOk(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await runAsync(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  return r.stdout;
}
