/**
 * `nbdd create -f qcow2 IMAGE [SIZE] [--backing FILE] [--backing-format F] [--cluster-size N]`:
 * creates an empty qcow2 v3 image (or a sparse raw file). SIZE accepts K/M/G/T suffixes and
 * defaults to the backing file's size. A backing NBD URI is stored as given (qemu reads it too);
 * nbdd opens such overlays with --allow-remote-backing.
 */
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { Errno, NbddError } from '../core/errors.js';
import { formatSize, parseSize } from '../core/units.js';
import { openNbd } from '../backends/nbd.js';
import { createQcow2 } from '../backends/qcow2/create.js';
import { lockImage } from '../io/image-lock.js';

interface CreateOptions {
  format: 'qcow2' | 'raw';
  backing?: string;
  backingFormat?: 'qcow2' | 'raw';
  clusterSize: string;
  force?: boolean;
}

/**
 * Refuses to replace an existing file unless `force`, and never replaces one that a running nbdd
 * (or anything else holding a flock on it) has open: creating over a live image loses data.
 */
async function checkTarget(image: string, force: boolean): Promise<void> {
  const fh = await open(image, fsConstants.O_RDONLY).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw err;
  });
  if (!fh) return;
  try {
    if (!force) throw new NbddError(Errno.EEXIST, `${image} exists; nbdd create does not overwrite an image unless --force is given`);
    lockImage(fh.fd, image, 'replace');
  } finally {
    await fh.close();
  }
}

/** The size of the export an NBD URI names (the size of an overlay created over it). */
async function exportSize(uri: string): Promise<number> {
  const remote = await openNbd(uri, { readOnly: true, reconnectDelayMs: 0 });
  try {
    return remote.size;
  } finally {
    await remote.close();
  }
}

export function register(program: Command): void {
  program
    .command('create')
    .description('create an empty disk image (qcow2 v3, or sparse raw)')
    .argument('<image>', 'path of the new image (an existing file is refused unless --force)')
    .argument('[size]', 'virtual size, e.g. 10G (default: the backing file\'s size)')
    .addOption(new Option('-f, --format <format>', 'image format').choices(['qcow2', 'raw']).default('qcow2'))
    .option('-b, --backing <file>', 'backing file (qcow2 only; relative to the image\'s directory), or an NBD URI (nbd://, nbd+unix://, nbds://)')
    .addOption(new Option('-F, --backing-format <format>', 'backing file format (default: probed; raw for an NBD URI)').choices(['qcow2', 'raw']))
    .option('--cluster-size <bytes>', 'qcow2 cluster size, 512 to 2M', '64K')
    .option('--force', 'replace an existing file (never one in use)')
    .action(async (image: string, size: string | undefined, opts: CreateOptions) => {
      const bytes = size === undefined ? undefined : parseSize(size);
      await checkTarget(image, !!opts.force);
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
        await createQcow2(image, { size: bytes, clusterSize: parseSize(opts.clusterSize), backing: opts.backing, backingFormat: opts.backingFormat, remoteSize: exportSize });
      }
      process.stdout.write(`Formatting '${image}', fmt=${opts.format}${bytes !== undefined ? ` size=${bytes} (${formatSize(bytes)})` : ''}${opts.backing ? ` backing_file=${opts.backing}` : ''}\n`);
    });
}
