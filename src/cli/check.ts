/**
 * `nbdd check IMAGE [--repair leaks|all] [--json]`: the qcow2 consistency check and repair
 * (src/backends/qcow2/check/), reported as `qemu-img check` reports it, with its exit codes:
 * 0 consistent, 1 the check could not run, 2 corruptions, 3 leaked clusters only.
 *
 * The JSON uses `qemu-img check --output=json`'s keys, plus `messages` and `cleared`.
 */
import { Command, Option } from 'commander';
import { messageOf } from '../core/errors.js';
import { probeFormat } from '../backends/probe.js';
import { checkExitCode, checkQcow2, type CheckReport, type RepairMode } from '../backends/qcow2/check/index.js';

interface CheckOptions {
  repair?: RepairMode;
  json?: boolean;
}

function plural(n: number, one: string, many: string): string {
  return `${n} ${n === 1 ? one : many}`;
}

export function formatCheckText(r: CheckReport, repaired: boolean): string {
  const out: string[] = [];
  for (const m of r.messages) out.push(m);
  if (repaired && (r.leaksFixed > 0 || r.corruptionsFixed > 0)) {
    out.push('The following inconsistencies were found and repaired:', '', `    ${plural(r.leaksFixed, 'leaked cluster', 'leaked clusters')}`, `    ${plural(r.corruptionsFixed, 'corruption', 'corruptions')}`, '');
    out.push('Double checking the fixed image now...');
  }
  if (r.corruptions === 0 && r.leaks === 0) out.push('No errors were found on the image.');
  if (r.corruptions > 0) out.push(...(out.length > 0 ? [''] : []), `${plural(r.corruptions, 'error was', 'errors were')} found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (r.leaks > 0) out.push('', `${plural(r.leaks, 'leaked cluster was', 'leaked clusters were')} found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (r.cleared.length > 0) out.push(`Cleared the ${r.cleared.join(' and ')} bit${r.cleared.length > 1 ? 's' : ''} in the header.`);
  const pct = (n: number): string => (r.totalClusters > 0 ? ((100 * n) / r.totalClusters).toFixed(2) : '0.00');
  const ofAllocated = (n: number): string => (r.allocatedClusters > 0 ? ((100 * n) / r.allocatedClusters).toFixed(2) : '0.00');
  out.push(`${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters)}% allocated, ${ofAllocated(r.fragmentedClusters)}% fragmented, ${ofAllocated(r.compressedClusters)}% compressed clusters`);
  out.push(`Image end offset: ${r.imageEndOffset}`);
  return `${out.join('\n')}\n`;
}

export function checkJson(r: CheckReport): object {
  return {
    'image-end-offset': r.imageEndOffset,
    'total-clusters': r.totalClusters,
    'check-errors': r.checkErrors,
    'allocated-clusters': r.allocatedClusters,
    'fragmented-clusters': r.fragmentedClusters,
    'compressed-clusters': r.compressedClusters,
    filename: r.filename,
    format: r.format,
    corruptions: r.corruptions,
    leaks: r.leaks,
    'corruptions-fixed': r.corruptionsFixed,
    'leaks-fixed': r.leaksFixed,
    cleared: r.cleared,
    messages: r.messages,
  };
}

export function register(program: Command): void {
  program
    .command('check')
    .description('check a qcow2 image for corruptions and leaked clusters, and repair them (like qemu-img check)')
    .argument('<image>', 'qcow2 image (not in use by a writer)')
    .addOption(new Option('-r, --repair <what>', 'repair leaked clusters only, or all refcount errors and COPIED flags (clears the dirty and corrupt bits once consistent)').choices(['leaks', 'all']))
    .option('--json', 'print the result as JSON (qemu-img check --output=json keys)')
    .action(async (image: string, opts: CheckOptions) => {
      let report: CheckReport;
      try {
        if ((await probeFormat(image)) !== 'qcow2') throw new Error(`${image} is not a qcow2 image (raw images have nothing to check)`);
        report = await checkQcow2(image, { repair: opts.repair });
      } catch (err) {
        // Exit 1 as qemu-img: 2 and 3 mean corruptions and leaks here, never "no such file".
        process.stderr.write(`nbdd: ${messageOf(err)}\n`);
        process.exitCode = 1;
        return;
      }
      process.stdout.write(opts.json ? `${JSON.stringify(checkJson(report), null, 2)}\n` : formatCheckText(report, opts.repair !== undefined));
      process.exitCode = checkExitCode(report);
    });
}
