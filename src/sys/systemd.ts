/**
 * The two systemd protocols a service speaks, without libsystemd:
 *
 * - readiness (sd_notify(3)): `KEY=VALUE` lines in one datagram to `$NOTIFY_SOCKET` (a path, or
 *   `@name` for an abstract socket) — READY=1 once the device or socket is usable, STATUS=,
 *   MAINPID=, STOPPING=1. Without `$NOTIFY_SOCKET` nothing is sent.
 * - socket activation (sd_listen_fds(3)): listening sockets passed from fd 3 on, when
 *   `$LISTEN_PID` is this process and `$LISTEN_FDS` counts them.
 *
 * Failing to notify is logged, never fatal: the service still works, systemd just waits.
 */
import { logger } from '../core/log.js';
import { messageOf } from '../core/errors.js';
import { sendUnixDatagram } from './libc.js';

const log = logger('systemd');

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;

/** Sends `fields` as one notification; returns whether there was a socket to send to. */
export function sdNotify(fields: Record<string, string | number>, env: NodeJS.ProcessEnv = process.env): boolean {
  const socket = env.NOTIFY_SOCKET;
  if (!socket) return false;
  if (!socket.startsWith('/') && !socket.startsWith('@')) {
    log.warn(`NOTIFY_SOCKET=${socket}: only unix sockets are supported; not notifying`);
    return false;
  }
  const text = Object.entries(fields)
    .map(([k, v]) => `${k}=${String(v).replace(/\n/g, ' ')}`)
    .join('\n');
  try {
    sendUnixDatagram(socket, Buffer.from(`${text}\n`));
    return true;
  } catch (err) {
    log.warn(`notifying systemd (${socket}): ${messageOf(err)}`);
    return false;
  }
}

/**
 * The listening fds systemd passed to this process (empty when none, or when they were meant for
 * another process). Clears the variables, as sd_listen_fds(1) does, so children do not inherit them.
 */
export function listenFds(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number[] {
  const count = Number(env.LISTEN_FDS);
  const forUs = env.LISTEN_PID !== undefined && Number(env.LISTEN_PID) === pid;
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (!forUs || !Number.isInteger(count) || count <= 0) return [];
  return Array.from({ length: count }, (_, i) => LISTEN_FDS_START + i);
}
