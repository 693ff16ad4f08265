/**
 * Every CLI command: each module exports `register(program)`; add one entry per module, with the
 * command names it registers. A command line that names a command loads that module alone, so
 * `nbdd serve` keeps out of its memory the code of backup, ublk, the kernel devices and the
 * rest (3.4 MiB of V8 heap, docs/performance.md); help and unknown names load them all.
 */
import type { Command } from 'commander';

export type RegisterCommand = (program: Command) => void;

export interface CommandModule {
  /** The top-level commands `register` adds (a unit test checks). */
  names: readonly string[];
  load: () => Promise<{ register: RegisterCommand }>;
}

/** In the order `nbdd --help` lists them. */
export const commands: readonly CommandModule[] = [
  { names: ['serve'], load: () => import('./serve.js') },
  { names: ['attach'], load: () => import('./attach.js') },
  { names: ['detach'], load: () => import('./detach.js') },
  { names: ['list'], load: () => import('./list.js') },
  { names: ['create'], load: () => import('./create.js') },
  { names: ['install-udev'], load: () => import('./install-udev.js') },
  { names: ['install-systemd'], load: () => import('./install-systemd.js') },
  { names: ['info'], load: () => import('./info.js') },
  { names: ['check'], load: () => import('./check.js') },
  { names: ['map'], load: () => import('./map.js') },
  { names: ['status'], load: () => import('./status.js') },
  { names: ['bitmap'], load: () => import('./bitmap.js') },
  { names: ['events'], load: () => import('./events.js') },
  { names: ['backup', 'backups', 'restore', 'verify'], load: () => import('./backup.js') },
];

/**
 * The module of the command `args` (the arguments after node and the script) names, or undefined
 * when they name none of them (help, --version, a typo: commander then needs every command).
 * Options before the command are the program's own; `valueOptions` are those that take a value.
 */
export function commandModule(args: readonly string[], valueOptions: readonly string[]): CommandModule | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (valueOptions.includes(a)) i++;
    else if (valueOptions.some((o) => a.startsWith(`${o}=`))) continue;
    else if (a.startsWith('-')) return undefined;
    else return commands.find((c) => c.names.includes(a));
  }
  return undefined;
}
