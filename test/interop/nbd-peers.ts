/**
 * Real NBD servers for the client's interop tests: nbdkit, qemu-nbd and nbd-server on Unix sockets
 * in a private temp dir. Each start checks the tool exists (failing with the install command) and
 * waits until the socket accepts; `stop()` sends SIGTERM and throws unless the server is gone
 * within 10 s.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { requireTool, run } from '../helpers/tools.js';

export { requireTool, run, tempDir } from '../helpers/tools.js';

export interface Peer {
  /** `nbd+unix:///EXPORT?socket=…` */
  uri: string;
  socket: string;
  stop: () => Promise<void>;
  /** SIGKILL (a crash, for connection-loss tests); resolves when the process is gone. */
  kill: () => Promise<void>;
  /** The server's pid (SIGSTOP/SIGCONT for a server that hangs). */
  pid: number;
}

function accepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitFor(what: string, cond: () => Promise<boolean> | boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

function alive(pid: number): boolean {
  try {
    // A zombie (not reaped by a container's init) has exited as far as we care.
    return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * SIGSTOP, resolved once every thread of `pid` is stopped. kill() returns before the stop takes
 * effect: on a loaded machine a server thread woken by socket data can still answer a request
 * sent right after it, while the thread the signal went to waits for a CPU.
 */
export async function freeze(pid: number): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  const stopped = (): boolean =>
    readdirSync(`/proc/${pid}/task`).every((t) => {
      try {
        return /\) [tT] /.test(readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8'));
      } catch {
        return true; // the thread exited
      }
    });
  await waitFor(`pid ${pid} to stop after SIGSTOP`, stopped);
}

async function terminate(pid: number, name: string, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (!alive(pid)) throw new Error(`${name} (pid ${pid}) died before the test ended`);
  process.kill(pid, signal);
  try {
    await waitFor(`${name} to exit after ${signal}`, () => !alive(pid));
  } catch (err) {
    process.kill(pid, 'SIGKILL');
    throw err;
  }
}

/** Starts `tool args…` in the foreground as our child, serving `socket`. */
async function startChild(tool: string, args: string[], socket: string, exportName: string): Promise<Peer> {
  requireTool(tool);
  const child = spawn(tool, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (b) => (stderr += b));
  try {
    await waitFor(`${tool} on ${socket}`, async () => {
      if (child.exitCode !== null) throw new Error(`${tool} exited ${child.exitCode}: ${stderr}`);
      return existsSync(socket) && accepts(socket);
    });
  } catch (err) {
    child.kill('SIGKILL');
    throw err;
  }
  return {
    uri: `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`,
    socket,
    stop: () => terminate(child.pid!, tool),
    kill: () => terminate(child.pid!, tool, 'SIGKILL'),
    pid: child.pid!,
  };
}

/** `nbdkit -f -U SOCK PLUGIN ARGS…` (default export ''). */
export function startNbdkit(dir: string, pluginArgs: string[]): Promise<Peer> {
  return startNbdkitAt(join(dir, `nbdkit-${Math.random().toString(36).slice(2)}.sock`), pluginArgs);
}

/** As `startNbdkit`, on a given socket path (a server restarted where its clients look for it). */
export function startNbdkitAt(socket: string, pluginArgs: string[]): Promise<Peer> {
  rmSync(socket, { force: true });
  return startChild('nbdkit', ['-f', '-U', socket, ...pluginArgs], socket, '');
}

/** `qemu-nbd -k SOCK -t -e 8 -x EXPORT ARGS… FILE` (8 clients at once: tests run nbdinfo beside our client). */
export function startQemuNbd(dir: string, exportName: string, args: string[]): Promise<Peer> {
  return startQemuNbdAt(join(dir, `qemu-nbd-${Math.random().toString(36).slice(2)}.sock`), exportName, args);
}

/** As `startQemuNbd`, on a given socket path (a server restarted where its clients look for it). */
export function startQemuNbdAt(socket: string, exportName: string, args: string[]): Promise<Peer> {
  rmSync(socket, { force: true });
  return startChild('qemu-nbd', ['-k', socket, '-t', '-e', '8', '-x', exportName, ...args], socket, exportName);
}

/**
 * nbd-server 3.24 with a config file on a Unix socket. It daemonizes; its pid comes from the pid
 * file. `exports` maps export names to config lines (exportname = …, readonly = true, …).
 */
export async function startNbdServer(dir: string, exports: Record<string, string[]>): Promise<Peer & { exportUri: (name: string) => string }> {
  requireTool('nbd-server');
  const id = Math.random().toString(36).slice(2);
  const socket = join(dir, `nbd-server-${id}.sock`);
  const pidFile = join(dir, `nbd-server-${id}.pid`);
  const conf = join(dir, `nbd-server-${id}.conf`);
  const sections = Object.entries(exports).map(([name, lines]) => `[${name}]\n${lines.map((l) => `    ${l}`).join('\n')}\n`);
  writeFileSync(conf, `[generic]\n    unixsock = ${socket}\n    allowlist = true\n${sections.join('')}`);
  run('nbd-server', ['-C', conf, '-p', pidFile]);
  await waitFor(`nbd-server on ${socket}`, async () => existsSync(pidFile) && existsSync(socket) && accepts(socket));
  const pid = Number(readFileSync(pidFile, 'utf8').trim());
  const exportUri = (name: string): string => `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
  return {
    uri: exportUri(Object.keys(exports)[0]!),
    socket,
    exportUri,
    stop: () => terminate(pid, 'nbd-server'),
    kill: () => terminate(pid, 'nbd-server', 'SIGKILL'),
    pid,
  };
}
