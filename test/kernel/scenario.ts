/**
 * Shared pieces of the kernel scenarios: the bash prelude every scenario starts with, and
 * readers for the files a scenario leaves in $WORK.
 */
import { expect } from 'vitest';
import { describeRun, runInVm, type VmOptions, type VmResult } from './vm.js';

/**
 * `nbdd` runs the checkout's CLI; `record NAME CMD...` runs a command that is expected to fail,
 * keeping its stderr in $WORK/NAME.err and its exit status in $WORK/NAME.rc.
 */
export const PRELUDE = `
PS4='+\${SECONDS}s '
set -x
nbdd() { "$REPO/bin/nbdd" "$@"; } # through its first line: node with nbdd's flags
record() { local name=$1; shift; "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; echo $? > "$WORK/$name.rc"; }
daemon_pid() { grep '"pid"' "/run/nbdd/$1.json" | tr -dc 0-9; }
cd /tmp
`;

const FINISHED = 'scenario-finished';

export class Scenario {
  constructor(readonly result: VmResult) {}

  /** Runs PRELUDE + body in one VM boot; the body must finish within `opts.timeoutMs` (default 8 min). */
  static async run(body: string, opts: VmOptions = {}): Promise<Scenario> {
    return new Scenario(await runInVm(`${PRELUDE}${body}\necho ok > $WORK/${FINISHED}\n`, { timeoutMs: 480_000, ...opts }));
  }

  /** Whether the scenario reached its last line (the VM was not killed on the way). */
  get finished(): boolean {
    return this.result.files.has(FINISHED);
  }

  /** A file the scenario wrote; fails the test with the run's log when it is missing or the run was cut short. */
  text(name: string): string {
    expect(this.finished, `the scenario did not finish\n${describeRun(this.result)}`).toBe(true);
    const f = this.result.files.get(name);
    expect(f, `the scenario left no $WORK/${name}\n${describeRun(this.result)}`).toBeDefined();
    return f!.toString('utf8');
  }

  json<T = unknown>(name: string): T {
    return JSON.parse(this.text(name)) as T;
  }

  /** The exit status `record` kept for NAME. */
  status(name: string): number {
    return Number(this.text(`${name}.rc`).trim());
  }

  get log(): string {
    return describeRun(this.result);
  }
}
