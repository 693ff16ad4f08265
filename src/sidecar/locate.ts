/** From what a user names on the command line to a control socket path. */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { Errno, NbddError } from '../core/errors.js';
import { runDir } from '../core/paths.js';
import { CONTROL_SOCKET } from './sidecar.js';

/**
 * `target` may be a sidecar directory, a control socket, or a device/export NAME (whose sidecar
 * is `$NBDD_RUN_DIR/NAME`, default /run/nbdd/NAME). Throws ENOENT when nothing is there.
 */
export function controlSocketOf(target: string): string {
  const candidates = target.includes('/') ? [target, join(target, CONTROL_SOCKET)] : [join(runDir(), target, CONTROL_SOCKET)];
  for (const c of candidates) {
    const st = statSync(c, { throwIfNoEntry: false });
    if (st?.isSocket()) return c;
  }
  throw new NbddError(Errno.ENOENT, `no nbdd sidecar for '${target}' (looked for ${candidates.join(', ')})`);
}
