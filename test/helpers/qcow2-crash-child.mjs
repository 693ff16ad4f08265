// Child of the qcow2 crash test: applies crashBatches(seed) to IMAGE through the built backend
// (dist/), printing "A <b> <i>" on stdout when op i of batch b is acknowledged, and "F <n>" after
// the flush that follows batch n-1 completed (stdout is a pipe: these writes are synchronous).
import { openQcow2 } from '../../dist/backends/qcow2/open.js';
import { crashBatches, runBatch } from './qcow2-crash-ops.mjs';

const [image, seedArg, sizeArg, clusterArg] = process.argv.slice(2);
const img = await openQcow2(image, { readOnly: false });
const batches = crashBatches(Number(seedArg), 100000, Number(sizeArg), Number(clusterArg));
process.stdout.write('READY\n');
for (let b = 0; b < batches.length; b++) {
  await runBatch(img, batches[b], (i) => process.stdout.write(`A ${b} ${i}\n`));
  await img.flush();
  process.stdout.write(`F ${b + 1}\n`);
}
