/**
 * PR_SET_IO_FLUSHER on a serving daemon's I/O threads (src/sys/io-flusher.ts, native/flusher.c):
 * the kernel marks such threads PF_MEMALLOC_NOIO, visible in /proc/PID/task/TID/stat (field 9,
 * the task flags). The event loop and every libuv pool thread must have it. That needs
 * CAP_SYS_RESOURCE, which the build containers lack: there the daemon must still serve, saying why
 * (the kernel tier checks the flags in the VM, test/kernel/attach-fs.test.ts).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { run, serveNbdd, tempDir } from '../helpers/tools.js';

const PF_MEMALLOC_NOIO = 0x00080000;
let dir: ReturnType<typeof tempDir>;

beforeAll(() => {
  dir = tempDir('nbdd-flusher-');
});
afterAll(() => dir.remove());

/** Task flags of every thread of `pid`, by thread id. */
function taskFlags(pid: number): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    out.set(Number(tid), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[6]));
  }
  return out;
}

/** CAP_SYS_RESOURCE (bit 24) in this process's effective set. */
const canFlush = (BigInt(`0x${/^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]}`) & (1n << 24n)) !== 0n;

it.runIf(!canFlush)('without CAP_SYS_RESOURCE nbdd serve still serves, and says why it is no I/O flusher', async () => {
  const image = join(dir.path, 'plain.raw');
  run('truncate', ['-s', '16M', image]);
  const served = await serveNbdd(image, ['--log-level', 'debug']);
  try {
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 1M', '-c', 'read -P 7 0 1M', served.uri]);
    expect(served.stderr()).toMatch(/PR_SET_IO_FLUSHER refused \(EPERM; it needs CAP_SYS_RESOURCE\)/);
  } finally {
    await served.stop();
  }
});

it.runIf(canFlush)('nbdd serve sets PR_SET_IO_FLUSHER on the event loop and all 16 pool threads', async () => {
  const image = join(dir.path, 'disk.raw');
  run('truncate', ['-s', '16M', image]);
  const served = await serveNbdd(image, ['--log-level', 'debug']);
  try {
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 1M', '-c', 'read -P 7 0 1M', served.uri]);
    const pid = served.child.pid!;
    const flags = taskFlags(pid);
    expect(flags.get(pid)! & PF_MEMALLOC_NOIO).toBe(PF_MEMALLOC_NOIO);
    const flagged = [...flags.values()].filter((f) => (f & PF_MEMALLOC_NOIO) !== 0).length;
    expect(flagged).toBeGreaterThanOrEqual(1 + 16); // bin/nbdd sets UV_THREADPOOL_SIZE=16
    expect(served.stderr()).toMatch(/PR_SET_IO_FLUSHER set on the event loop and 16 pool threads/);
  } finally {
    await served.stop();
  }
});
