/** The command table: each module registers the names the table gives it, and a command line loads its module alone. */
import { Command } from 'commander';
import { describe, expect, it } from 'vitest';
import { commandModule, commands } from '../../src/cli/commands.js';
import { distUrl, loadedModules } from '../helpers/loaded-modules.js';

/** The dist/ modules a node process loads while it builds the program for `args`. */
function loadedFor(args: string[]): string[] {
  return loadedModules(
    [`const { buildProgram } = await import(${JSON.stringify(distUrl('cli/main.js'))});`, `await buildProgram(['node', 'nbdd', ...${JSON.stringify(args)}]);`].join('\n'),
  );
}

describe('CLI command table', () => {
  it('names, for each module, exactly the top-level commands it registers', async () => {
    for (const c of commands) {
      const program = new Command('nbdd');
      (await c.load()).register(program);
      expect(program.commands.map((cmd) => cmd.name())).toEqual(c.names);
    }
  });

  it('finds the command after the program options', () => {
    const name = (args: string[]) => commandModule(args, ['--log-level'])?.names[0];
    expect(name(['serve', 'x.qcow2'])).toBe('serve');
    expect(name(['--log-level', 'debug', 'status', 'dev0'])).toBe('status');
    expect(name(['--log-level=debug', 'restore'])).toBe('backup');
    expect(name(['serve', '--help'])).toBe('serve');
    expect(name(['--help'])).toBeUndefined();
    expect(name(['-V'])).toBeUndefined();
    expect(name(['help', 'serve'])).toBeUndefined();
    expect(name(['serv'])).toBeUndefined(); // a typo: commander suggests from every command
    expect(name([])).toBeUndefined();
    expect(name(['--log-level'])).toBeUndefined();
  });

  it('loads the named command without the others, and every command without a name', () => {
    const create = loadedFor(['create', 'x.qcow2', '1G']);
    expect(create).toContain('cli/create.js');
    for (const m of ['cli/serve.js', 'cli/attach.js', 'cli/backup.js', 'kernel/device.js', 'nbd/server/frontend.js']) expect(create).not.toContain(m);
    expect(create.filter((m) => m.startsWith('backup/') || m.startsWith('ublk/'))).toEqual([]);
    // The program's options that take a value come from the program itself.
    expect(loadedFor(['--log-level', 'debug', 'create', 'x.qcow2', '1G'])).not.toContain('cli/serve.js');
    const all = loadedFor(['--help']);
    for (const m of ['cli/serve.js', 'cli/create.js', 'cli/backup.js', 'cli/attach.js']) expect(all).toContain(m);
  });
});
