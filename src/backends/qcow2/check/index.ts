/**
 * `nbdd check`: the reference scan of a qcow2 image (scan.ts) and, when asked, its repair
 * (repair.ts), reported the way `qemu-img check` reports: corruptions, leaks, what was fixed, the
 * allocation summary and the image end offset. After a repair the image is scanned again; when no
 * corruption remains the dirty bit (lazy refcounts) and the corrupt bit are cleared, so the image
 * opens for writing again.
 */
import { NodeFilePort, type FilePort } from '../../../io/file-port.js';
import { lockImage } from '../../../io/image-lock.js';
import { fileError } from '../../../core/errors.js';
import {
  featureField,
  HEADER,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
} from '../format/index.js';
import { readClusterZero } from '../read-header.js';
import { repairRefcounts, type RepairMode } from './repair.js';
import { corruptionsOf, scanImage, type ScanInput } from './scan.js';

export type { RepairMode } from './repair.js';
export { scanImage, type ScanResult } from './scan.js';

export interface CheckReport {
  filename: string;
  format: 'qcow2';
  /** Problems left after the check (and repair): qemu-img check's categories. */
  corruptions: number;
  leaks: number;
  /** Errors that kept the check from completing (qemu-img's check-errors). */
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** What was found, one line per problem (capped), in qemu-img check's wording where it has one. */
  messages: string[];
  /** Header bits cleared by the repair. */
  cleared: ('dirty' | 'corrupt')[];
}

/** qemu-img check's exit status for a report: 0 clean, 2 corruptions, 3 leaks only (1: the check failed). */
export function checkExitCode(r: CheckReport): number {
  if (r.checkErrors > 0) return 1;
  if (r.corruptions > 0) return 2;
  if (r.leaks > 0) return 3;
  return 0;
}

async function readInput(port: FilePort): Promise<ScanInput> {
  const fileLength = await port.length();
  const { header, geometry, extensions } = await readClusterZero(port, fileLength);
  return { port, header, extensions, geometry, fileLength };
}

/** Checks (and with `repair`, repairs) the qcow2 image at `path`. Throws NbddError when it cannot be read as qcow2. */
export async function checkQcow2(path: string, options: { repair?: RepairMode } = {}): Promise<CheckReport> {
  const port = await NodeFilePort.open(path, { readOnly: !options.repair }).catch((err: unknown) => {
    throw fileError(path, err);
  });
  try {
    // Like qemu-img: a repair needs the image to itself; a check only keeps writers out.
    lockImage(port.fd, path, options.repair ? 'write' : 'read');
    let input = await readInput(port);
    let scan = await scanImage(input);
    const report: CheckReport = {
      filename: path,
      format: 'qcow2',
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      imageEndOffset: 0,
      totalClusters: 0,
      allocatedClusters: 0,
      fragmentedClusters: 0,
      compressedClusters: 0,
      messages: [...scan.messages],
      cleared: [],
    };
    if (options.repair && (corruptionsOf(scan) > 0 || scan.leaks > 0 || (input.header.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) !== 0n)) {
      const fixed = await repairRefcounts(port, input.geometry, scan, options.repair);
      report.corruptionsFixed = fixed.corruptionsFixed;
      report.leaksFixed = fixed.leaksFixed;
      input = await readInput(port);
      scan = await scanImage(input);
      if (corruptionsOf(scan) === 0) {
        const bits = input.header.incompatibleFeatures;
        const clear = bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if (clear !== 0n && input.header.version === 3) {
          await port.writeAt(featureField(bits & ~clear), HEADER.incompatibleFeatures);
          await port.fsync();
          if (clear & INCOMPAT_DIRTY) report.cleared.push('dirty');
          if (clear & INCOMPAT_CORRUPT) report.cleared.push('corrupt');
        }
      }
    }
    return {
      ...report,
      corruptions: corruptionsOf(scan),
      leaks: scan.leaks,
      imageEndOffset: scan.imageEndOffset,
      totalClusters: scan.totalClusters,
      allocatedClusters: scan.allocatedClusters,
      fragmentedClusters: scan.fragmentedClusters,
      compressedClusters: scan.compressedClusters,
    };
  } finally {
    await port.close();
  }
}
