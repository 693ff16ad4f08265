/**
 * `nbdd create -f qcow2 IMAGE [SIZE] [--backing FILE] [--backing-format F] [--cluster-size N]`:
 * creates an empty qcow2 v3 image (or a sparse raw file). SIZE accepts K/M/G/T suffixes and
 * defaults to the backing file's size.
 */
import { open } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { Errno, NbddError } from '../core/errors.js';
import { formatSize, parseSize } from '../core/units.js';
import { createQcow2 } from '../backends/qcow2/create.js';

interface CreateOptions {
  format: 'qcow2' | 'raw';
  backing?: string;
  backingFormat?: 'qcow2' | 'raw';
  clusterSize: string;
}

export function register(program: Command): void {
  program
    .command('create')
    .description('create an empty disk image (qcow2 v3, or sparse raw)')
    .argument('<image>', 'path of the new image (overwritten if it exists, as qemu-img does)')
    .argument('[size]', 'virtual size, e.g. 10G (default: the backing file\'s size)')
    .addOption(new Option('-f, --format <format>', 'image format').choices(['qcow2', 'raw']).default('qcow2'))
    .option('-b, --backing <file>', 'backing file (qcow2 only; relative to the image\'s directory)')
    .addOption(new Option('-F, --backing-format <format>', 'backing file format (default: probed)').choices(['qcow2', 'raw']))
    .option('--cluster-size <bytes>', 'qcow2 cluster size, 512 to 2M', '64K')
    .action(async (image: string, size: string | undefined, opts: CreateOptions) => {
      const bytes = size === undefined ? undefined : parseSize(size);
      if (opts.format === 'raw') {
        if (opts.backing) throw new NbddError(Errno.EINVAL, 'raw images have no backing file');
        if (bytes === undefined) throw new NbddError(Errno.EINVAL, 'a size is needed for a raw image');
        const fh = await open(image, 'w', 0o644);
        try {
          await fh.truncate(bytes);
        } finally {
          await fh.close();
        }
      } else {
        await createQcow2(image, { size: bytes, clusterSize: parseSize(opts.clusterSize), backing: opts.backing, backingFormat: opts.backingFormat });
      }
      process.stdout.write(`Formatting '${image}', fmt=${opts.format}${bytes !== undefined ? ` size=${bytes} (${formatSize(bytes)})` : ''}${opts.backing ? ` backing_file=${opts.backing}` : ''}\n`);
    });
}
