/**
 * `nbdd install-systemd`: installs the systemd units shipped in systemd/ — nbdd@.service (attach,
 * Type=notify) and nbdd-serve@.socket + nbdd-serve@.service (serve, socket-activated) — with
 * ExecStart naming this nbdd, creates /etc/nbdd for the per-device NAME.conf files, and asks a
 * running systemd to reload. See docs/operations.md, "systemd".
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command } from 'commander';
import { Errno, NbddError } from '../core/errors.js';
import { NODE_FLAGS } from '../core/node-flags.js';

export const UNITS = ['nbdd@.service', 'nbdd-serve@.socket', 'nbdd-serve@.service'] as const;
/** The units shipped in the package (dist/cli → ../../systemd). */
const UNIT_DIR = fileURLToPath(new URL('../../systemd/', import.meta.url));
/** This nbdd as a command line: node (with nbdd's flags) and the bin/nbdd script, both absolute (systemd wants that). */
const NBDD_COMMAND = [process.execPath, ...NODE_FLAGS, resolve(fileURLToPath(new URL('../../bin/nbdd', import.meta.url)))].join(' ');

/** A unit's text with ExecStart pointing at `command`. */
export function unitText(unit: (typeof UNITS)[number], command = NBDD_COMMAND): string {
  return readFileSync(join(UNIT_DIR, unit), 'utf8').replaceAll('@NBDD@', command);
}

interface InstallOptions {
  dir: string;
  confDir: string;
  print?: boolean;
  reload: boolean;
}

function install(opts: InstallOptions): void {
  if (opts.print) {
    for (const u of UNITS) process.stdout.write(`# ${u}\n${unitText(u)}\n`);
    return;
  }
  try {
    mkdirSync(opts.dir, { recursive: true });
    mkdirSync(opts.confDir, { recursive: true, mode: 0o755 });
    for (const u of UNITS) {
      const target = join(opts.dir, u);
      writeFileSync(target, unitText(u), { mode: 0o644 });
      process.stdout.write(`${target}\n`);
    }
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const denied = e.code === 'EACCES' || e.code === 'EPERM';
    throw new NbddError(denied ? Errno.EACCES : Errno.EIO, `installing the units in ${opts.dir}: ${e.message}${denied ? ' (run as root)' : ''}`);
  }
  // Without a running systemd (containers, chroots) the units apply at its next start.
  if (opts.reload && existsSync('/run/systemd/system')) spawnSync('systemctl', ['daemon-reload'], { stdio: 'inherit' });
}

export function register(program: Command): void {
  program
    .command('install-systemd')
    .description('install nbdd@.service (attach /etc/nbdd/NAME.conf as a device) and nbdd-serve@.{socket,service} (socket-activated serve)')
    .option('--dir <dir>', 'unit directory', '/etc/systemd/system')
    .option('--conf-dir <dir>', 'where the NAME.conf files go (created if missing)', '/etc/nbdd')
    .option('--print', 'print the units instead of installing them')
    .option('--no-reload', 'do not run systemctl daemon-reload')
    .action((opts: InstallOptions) => install(opts));
}
