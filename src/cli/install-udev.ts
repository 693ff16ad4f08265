/**
 * `nbdd install-udev`: installs udev/60-nbdd.rules (stable /dev/disk/by-nbdd/NAME links, no
 * probing of unconnected nbd devices) and asks a running udevd to reload.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command } from 'commander';
import { Errno, NbddError } from '../core/errors.js';

export const RULES_NAME = '60-nbdd.rules';
/** The rules file shipped in the package (dist/cli → ../../udev). */
export const RULES_SOURCE = fileURLToPath(new URL(`../../udev/${RULES_NAME}`, import.meta.url));

function install(opts: { dir: string; print?: boolean; reload: boolean }): void {
  if (opts.print) {
    process.stdout.write(readFileSync(RULES_SOURCE, 'utf8'));
    return;
  }
  const target = join(opts.dir, RULES_NAME);
  try {
    mkdirSync(opts.dir, { recursive: true });
    copyFileSync(RULES_SOURCE, target);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new NbddError(e.code === 'EACCES' || e.code === 'EPERM' ? Errno.EACCES : Errno.EIO, `installing ${target}: ${e.message}${e.code === 'EACCES' ? ' (run as root)' : ''}`);
  }
  process.stdout.write(`${target}\n`);
  if (!opts.reload) return;
  // udevd may not run (containers, initramfs); the rules apply at its next start then.
  const reload = spawnSync('udevadm', ['control', '--reload'], { stdio: 'ignore' });
  if (reload.status === 0) {
    spawnSync('udevadm', ['trigger', '--action=change', '--subsystem-match=block', '--sysname-match=nbd*'], { stdio: 'ignore' });
  }
}

export function register(program: Command): void {
  program
    .command('install-udev')
    .description('install the udev rules: /dev/disk/by-nbdd/NAME links, no probing of unconnected nbd devices')
    .option('--dir <dir>', 'rules directory', '/etc/udev/rules.d')
    .option('--print', 'print the rules instead of installing them')
    .option('--no-reload', 'do not ask udevd to reload and re-trigger nbd devices')
    .action((opts: { dir: string; print?: boolean; reload: boolean }) => install(opts));
}
