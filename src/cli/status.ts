/** `nbdd status DEVICE|NAME [--json]`: the state of a running device or export (control socket). */
import type { Command } from 'commander';
import { formatSize } from '../core/units.js';
import { controlCall } from './control-call.js';

interface Status {
  name: string;
  size: number;
  backend: string;
  readOnly: boolean;
  sidecar: { dir: string; nbdSocket: string; controlSocket: string; nbdConnections: number };
  bitmapStore: { kind: string; location: string } | null;
  bitmaps: { name: string; enabled: boolean; dirtyBytes: number; granularity: number }[];
  backup: { export: string; bitmap: string | null; copiedGranules: number; broken: string | null } | null;
  queueDepth: number;
}

export function register(program: Command): void {
  program
    .command('status')
    .description('show the state of a running device or export')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .option('--json', 'print the full status as JSON')
    .action(async (device: string, o: { json?: boolean }) => {
      const s = await controlCall<Status>(device, 'status');
      if (o.json) {
        process.stdout.write(`${JSON.stringify(s, null, 2)}\n`);
        return;
      }
      const lines = [
        `name:      ${s.name}`,
        `size:      ${formatSize(s.size)} (${s.backend}${s.readOnly ? ', read-only' : ''})`,
        `sidecar:   ${s.sidecar.dir} (${s.sidecar.nbdConnections} NBD clients)`,
        `nbd:       nbd+unix:///${encodeURIComponent(s.name)}?socket=${s.sidecar.nbdSocket}`,
        `bitmaps:   ${s.bitmaps.length === 0 ? 'none' : s.bitmaps.map((b) => `${b.name} (${b.enabled ? 'enabled' : 'disabled'}, ${formatSize(b.dirtyBytes)} dirty)`).join(', ')}`,
        `store:     ${s.bitmapStore ? `${s.bitmapStore.kind} ${s.bitmapStore.location}` : 'none (bitmaps are transient)'}`,
        `backup:    ${s.backup ? `export ${s.backup.export}${s.backup.bitmap ? `, bitmap ${s.backup.bitmap}` : ''}, ${s.backup.copiedGranules} granules copied${s.backup.broken ? `, BROKEN: ${s.backup.broken}` : ''}` : 'none'}`,
        `queue:     ${s.queueDepth} requests in flight`,
      ];
      process.stdout.write(`${lines.join('\n')}\n`);
    });
}
