// Child of the qcow2 crash test: applies crashBatches(seed) to IMAGE through the built backend
// (dist/), printing "F <n>" on stdout after the flush that follows batch n-1 completed.
import { openQcow2 } from '../../dist/backends/qcow2/open.js';
import { crashBatches } from './qcow2-crash-ops.mjs';

const [image, seedArg, sizeArg, clusterArg] = process.argv.slice(2);
const img = await openQcow2(image, { readOnly: false });
const batches = crashBatches(Number(seedArg), 100000, Number(sizeArg), Number(clusterArg));
process.stdout.write('READY\n');
for (let b = 0; b < batches.length; b++) {
  await Promise.all(
    batches[b].map((op) =>
      op.kind === 'write'
        ? img.write(op.off, Buffer.alloc(op.len, op.pattern))
        : op.kind === 'zero'
          ? img.writeZeroes(op.off, op.len, { noHole: false })
          : img.trim(op.off, op.len),
    ),
  );
  await img.flush();
  process.stdout.write(`F ${b + 1}\n`);
}
