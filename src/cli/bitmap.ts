/**
 * `nbdd bitmap add|remove|clear|enable|disable|merge|checkpoint|list DEVICE|NAME …`: dirty
 * bitmaps of a running device or export, through its control socket.
 */
import type { Command } from 'commander';
import type { BitmapInfo } from '../bitmaps/bitmap-set.js';
import { formatSize } from '../core/units.js';
import { controlCall } from './control-call.js';
import { sizeArg } from './options.js';

function printList(list: BitmapInfo[]): void {
  if (list.length === 0) {
    process.stdout.write('no bitmaps\n');
    return;
  }
  const rows = list.map((b) => [b.name, formatSize(b.granularity), b.enabled ? 'enabled' : 'disabled', b.persistent ? 'persistent' : 'transient', b.busy ? 'busy' : '', formatSize(b.dirtyBytes)]);
  const header = ['NAME', 'GRANULARITY', 'STATE', 'KEPT', 'BACKUP', 'DIRTY'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const r of [header, ...rows]) process.stdout.write(`${r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()}\n`);
}

export function register(program: Command): void {
  const bitmap = program.command('bitmap').description('manage the dirty bitmaps of a running device or export');
  bitmap
    .command('add')
    .description('add a bitmap (enabled, persistent when the disk has a store)')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .argument('<bitmap>', 'bitmap name')
    .option('-g, --granularity <size>', 'bytes per bit (power of two, 512 B .. 2 GiB)', sizeArg, 65536)
    .option('--disabled', 'start disabled (not recording)')
    .option('--transient', 'do not keep it across restarts')
    .action(async (device: string, name: string, o: { granularity: number; disabled?: boolean; transient?: boolean }) => {
      await controlCall(device, 'bitmap.add', { name, granularity: o.granularity, disabled: !!o.disabled, ...(o.transient ? { persistent: false } : {}) });
    });
  for (const [verb, what] of [
    ['remove', 'remove a bitmap'],
    ['clear', 'clear every bit of a bitmap'],
    ['enable', 'start recording writes'],
    ['disable', 'stop recording writes'],
  ] as const) {
    bitmap
      .command(verb)
      .description(what)
      .argument('<device>', 'device or export NAME, or its sidecar directory')
      .argument('<bitmap>', 'bitmap name')
      .action(async (device: string, name: string) => {
        await controlCall(device, `bitmap.${verb}`, { name });
      });
  }
  bitmap
    .command('merge')
    .description('merge SOURCE bitmaps into TARGET (TARGET |= SOURCE...)')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .argument('<target>', 'bitmap to merge into')
    .argument('<sources...>', 'bitmaps to merge from')
    .action(async (device: string, target: string, sources: string[]) => {
      await controlCall(device, 'bitmap.merge', { target, sources });
    });
  bitmap
    .command('checkpoint')
    .description('start bitmap NEW and disable the enabled ones, atomically')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .argument('<bitmap>', 'the new bitmap')
    .option('-g, --granularity <size>', 'bytes per bit', sizeArg, 65536)
    .action(async (device: string, name: string, o: { granularity: number }) => {
      await controlCall(device, 'checkpoint', { name, granularity: o.granularity });
    });
  bitmap
    .command('list')
    .description('list the bitmaps')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .option('--json', 'print JSON')
    .action(async (device: string, o: { json?: boolean }) => {
      const list = await controlCall<BitmapInfo[]>(device, 'bitmap.list');
      if (o.json) process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
      else printList(list);
    });
}
