/**
 * `nbdd backup SOURCE --repo DIR`, `nbdd backups --repo DIR`, `nbdd restore --repo DIR OUTPUT`,
 * `nbdd verify --repo DIR` (src/backup/; the repo layout and the checkpoint protocol are there).
 */
import { Command, Option } from 'commander';
import { formatSize } from '../core/units.js';
import { backup } from '../backup/backup.js';
import { Repo, type Compression } from '../backup/repo.js';
import { restore, verify } from '../backup/restore.js';
import { intArg } from './options.js';
import { MAX_NBD_CONNECTIONS } from '../backends/remote.js';

interface BackupCli {
  repo: string;
  full?: boolean;
  bitmap?: string;
  connections: number;
  progress: boolean;
  json?: boolean;
  compress?: Compression;
}

export function register(program: Command): void {
  program
    .command('backup')
    .description('back up a device or export into a repo: full the first time, then incremental (changes since the last completed point)')
    .argument('<source>', 'device or export NAME (its sidecar: point-in-time, crash-safe incrementals), or an NBD URI')
    .requiredOption('--repo <dir>', 'the repo: a new or empty directory, or one this source was backed up into')
    .option('--full', 'a full point even if the repo has one to build on')
    .option('--bitmap <name>', 'NBD URI sources: read changes from qemu:dirty-bitmap:NAME (e.g. qemu-nbd -B NAME)')
    .option('-c, --connections <n>', 'NBD connections to read with (when the export allows multi-conn)', intArg(1, MAX_NBD_CONNECTIONS), 1)
    .addOption(
      new Option('--compress [codec]', 'store data as compressed qcow2 clusters: zstd (the default; qemu 5.1 and later read it) or deflate (every qemu)')
        .choices(['zstd', 'deflate'])
        .preset('zstd'),
    )
    .option('--no-progress', 'no progress bar (there is none without a terminal either)')
    .option('--json', 'print a JSON summary')
    .action(async (source: string, opts: BackupCli) => {
      const r = await backup(source, { repo: opts.repo, full: opts.full, bitmap: opts.bitmap, connections: opts.connections, progress: opts.progress && !opts.json, compress: opts.compress });
      process.stdout.write(
        opts.json
          ? `${JSON.stringify(r)}\n`
          : `point ${r.point} (${r.kind}): ${r.file}, ${formatSize(r.bytesStored)} of data, ${formatSize(r.zeroBytes)} zero, file ${formatSize(r.fileBytes)}, ${r.seconds.toFixed(1)} s\n`,
      );
    });

  program
    .command('backups')
    .description('list the points of a backup repo, oldest first')
    .requiredOption('--repo <dir>', 'the repo')
    .option('--json', 'a JSON array')
    .action(async (opts: { repo: string; json?: boolean }) => {
      const repo = await Repo.open(opts.repo);
      const rows = repo.points.map((p) => ({ id: p.id, kind: p.kind, time: p.time, file: p.file, backing: p.backing, bytes: p.bytes, fileBytes: p.fileBytes, compression: p.compression ?? null, virtualSize: p.virtualSize, bitmap: p.bitmap, diskSha256: p.diskSha256 }));
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
        return;
      }
      process.stdout.write(`repo ${opts.repo}: ${repo.manifest.source}, ${formatSize(repo.manifest.virtualSize)}\n`);
      for (const r of rows) process.stdout.write(`${r.id}  ${r.kind.padEnd(11)}  ${r.time}  ${formatSize(r.bytes).padStart(10)}  ${r.file}\n`);
    });

  program
    .command('restore')
    .description('write the disk as it was at a point to OUTPUT (a new file, a block device or an NBD URI)')
    .argument('<output>', 'a new file, a block device, or an NBD URI')
    .requiredOption('--repo <dir>', 'the repo')
    .option('--point <id>', 'the point (default: the latest)')
    .addOption(new Option('-f, --format <format>', 'format of a new output file').choices(['raw', 'qcow2']).default('raw'))
    .option('--no-progress', 'no progress bar')
    .action(async (output: string, opts: { repo: string; point?: string; format: 'raw' | 'qcow2'; progress: boolean }) => {
      const r = await restore(opts.repo, output, { point: opts.point, format: opts.format, progress: opts.progress });
      process.stdout.write(`restored point ${r.point} to ${output} (${formatSize(r.bytesWritten)} of data written; every chunk matched the manifest)\n`);
    });

  program
    .command('verify')
    .description('check every point (or one and the points below it): qcow2 structure, stored ranges and disk checksums')
    .requiredOption('--repo <dir>', 'the repo')
    .option('--point <id>', 'only this point and the points it reads through')
    .option('--json', 'a JSON report')
    .action(async (opts: { repo: string; point?: string; json?: boolean }) => {
      const r = await verify(opts.repo, opts.point);
      process.stdout.write(opts.json ? `${JSON.stringify(r)}\n` : r.points.map((p) => `point ${p.id}: ok (${p.extents} stored ranges, ${p.chunks} chunks)\n`).join(''));
    });
}
