/** `nbdd list`: every nbd and ublk device with its driver, state, size, image, daemon, queues and timeouts. */
import { Command } from 'commander';
import { formatSize } from '../core/units.js';
import { inventory, type DeviceReport } from '../kernel/inventory.js';

function table(rows: DeviceReport[]): string {
  const head = ['DEVICE', 'DRIVER', 'STATE', 'SIZE', 'NAME', 'PID', 'CONN/Q', 'DEPTH', 'RO', 'TIMEOUT', 'DEAD-CONN', 'SIDECAR', 'IMAGE'];
  const dash = (v: unknown): string => (v === null || v === undefined ? '-' : String(v));
  const body = rows.map((d) => [
    d.device,
    d.driver,
    d.kernelState && d.kernelState !== 'live' && d.state !== 'idle' ? `${d.state}(${d.kernelState})` : d.state,
    d.state === 'idle' ? '-' : formatSize(d.sizeBytes),
    dash(d.name ?? (d.backend || null)),
    dash(d.daemonPid),
    dash(d.driver === 'ublk' ? d.queues : d.connections),
    dash(d.depth),
    d.readOnly ? 'yes' : 'no',
    d.timeoutS === null ? '-' : `${d.timeoutS}s`,
    d.deadConnTimeoutS === null ? '-' : `${d.deadConnTimeoutS}s`,
    dash(d.sidecar),
    dash(d.image),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  return [head, ...body].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}

export function register(program: Command): void {
  program
    .command('list')
    .description('list nbd and ublk devices: driver, state, size, image, daemon pid, connections or queues, read-only, timeouts')
    .option('--json', 'print a JSON array')
    .option('-a, --all', 'include idle devices')
    .action(async (opts: { json?: boolean; all?: boolean }) => {
      const rows = (await inventory()).filter((d) => opts.all || opts.json || d.state !== 'idle');
      process.stdout.write(opts.json ? `${JSON.stringify(rows, null, 2)}\n` : `${table(rows)}\n`);
    });
}
