/**
 * `nbdd` command line. Each command lives in its own module exporting `register(program)`;
 * this file only wires them together.
 */
import { Command, Option } from 'commander';
import { readFileSync } from 'node:fs';
import { NbddError, messageOf } from '../core/errors.js';
import { LogLevels, setLogLevel, type LogLevel } from '../core/log.js';
import { commandModule, commands } from './commands.js';

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

/** `NBDD_LOG` when it names a level (log.ts reads it too, for what runs before the CLI), else info. */
function defaultLogLevel(): LogLevel {
  const env = process.env.NBDD_LOG;
  return LogLevels.find((l) => l === env) ?? 'info';
}

/**
 * The program with the command `argv` names (every command when it names none, or when argv is
 * not given).
 */
export async function buildProgram(argv?: readonly string[]): Promise<Command> {
  const program = new Command('nbdd')
    .description('Block-device daemon: serve and attach qcow2, raw and remote NBD images')
    .version(version())
    .addOption(new Option('--log-level <level>', 'log verbosity').choices([...LogLevels]).default(defaultLogLevel()))
    .showHelpAfterError()
    .hook('preAction', (cmd) => setLogLevel(cmd.opts().logLevel as LogLevel));
  const valueOptions = program.options.filter((o) => o.required || o.optional).map((o) => o.long!);
  const named = argv && commandModule(argv.slice(2), valueOptions);
  const modules = await Promise.all((named ? [named] : commands).map((c) => c.load()));
  for (const m of modules) m.register(program);
  return program;
}

/** Entry point used by bin/nbdd. Errors print one line (`nbdd: message`) and exit non-zero. */
export async function main(argv: string[]): Promise<void> {
  try {
    await (await buildProgram(argv)).parseAsync(argv);
  } catch (err) {
    process.stderr.write(`nbdd: ${messageOf(err)}\n`);
    if (process.env.NBDD_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    process.exitCode = err instanceof NbddError && err.errno === 2 ? 2 : 1;
  }
}
