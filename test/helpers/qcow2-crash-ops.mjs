// Deterministic operations for the qcow2 crash test, shared by the test and its child process.

/** mulberry32 */
export function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Batches of operations: each batch is issued at once and followed by a flush.
 * An op is { kind: 'write' | 'zero' | 'discard', off, len, pattern }.
 */
export function crashBatches(seed, batches, size, cluster) {
  const rnd = prng(seed);
  const out = [];
  for (let b = 0; b < batches; b++) {
    const batch = [];
    const n = 1 + Math.floor(rnd() * 12);
    for (let i = 0; i < n; i++) {
      const len = 1 + Math.floor(rnd() * (rnd() < 0.3 ? 4 * cluster : cluster / 2));
      const off = Math.min(size - len, Math.floor(rnd() * size));
      const pick = rnd();
      const kind = pick < 0.75 ? 'write' : pick < 0.88 ? 'zero' : 'discard';
      batch.push({ kind, off, len, pattern: 1 + Math.floor(rnd() * 255) });
    }
    out.push(batch);
  }
  return out;
}

/** Applies an op to a raw model of the guest; discards zero whole clusters only (v3 over a backing file). */
export function applyOp(model, op, cluster) {
  if (op.kind === 'write') model.fill(op.pattern, op.off, op.off + op.len);
  else if (op.kind === 'zero') model.fill(0, op.off, op.off + op.len);
  else {
    const first = Math.ceil(op.off / cluster) * cluster;
    const last = Math.floor((op.off + op.len) / cluster) * cluster;
    if (last > first) model.fill(0, first, last);
  }
}

/** Issues one batch of ops at once on a qcow2 image (the backend API), resolving when all are acknowledged. */
export function runBatch(img, batch, onAck = () => {}) {
  return Promise.all(
    batch.map((op, i) =>
      (op.kind === 'write'
        ? img.write(op.off, Buffer.alloc(op.len, op.pattern))
        : op.kind === 'zero'
          ? img.writeZeroes(op.off, op.len, { noHole: false })
          : img.trim(op.off, op.len)
      ).then(() => onAck(i)),
    ),
  );
}

/** Whether an op of `pending` (issued together, not flushed) could have left `value` at byte `i`. */
export function explainedBy(pending, i, value) {
  return pending.some((op) => i >= op.off && i < op.off + op.len && value === (op.kind === 'write' ? op.pattern : 0));
}
