/**
 * Model checking for backends: seeded random writes, trims and write-zeroes applied to a backend
 * and to a plain Buffer; afterwards the backend must read back exactly the model's bytes, and its
 * block status must cover the disk with extents whose `zero` claims hold in the model.
 */
import { expect } from 'vitest';
import type { Backend, Extent } from '../../src/core/backend.js';

import { prng } from './prng.js';

export { prng };

export interface ModelOptions {
  seed: number;
  operations: number;
  /** Offsets and lengths are multiples of this (>= the filesystem's hole granularity for files). */
  granule: number;
  /** Longest request, in granules. */
  maxGranules: number;
}

/** Runs the random operations on a backend that reads as all zeroes; returns the expected content. */
export async function runModel(backend: Backend, options: ModelOptions): Promise<Buffer> {
  const model = Buffer.alloc(backend.size);
  const random = prng(options.seed);
  const granules = Math.floor(backend.size / options.granule);
  for (let i = 0; i < options.operations; i++) {
    const first = Math.floor(random() * granules);
    const count = 1 + Math.floor(random() * Math.min(options.maxGranules, granules - first));
    const offset = first * options.granule;
    const length = count * options.granule;
    const op = random();
    if (op < 0.5) {
      const data = Buffer.alloc(length, 1 + (i % 255));
      await backend.write(offset, data);
      data.copy(model, offset);
    } else if (op < 0.7) {
      await backend.trim!(offset, length);
      model.fill(0, offset, offset + length); // trimmed ranges of these backends read as zeroes
    } else {
      await backend.writeZeroes!(offset, length, { noHole: op < 0.85 });
      model.fill(0, offset, offset + length);
    }
  }
  return model;
}

/** Block status over the whole disk, asking again where a reply stopped short. */
export async function fullStatus(backend: Backend): Promise<Extent[]> {
  const all: Extent[] = [];
  for (let at = 0; at < backend.size; ) {
    const extents = await backend.blockStatus!(at, backend.size - at);
    expect(extents.length).toBeGreaterThan(0);
    for (const e of extents) {
      expect(e.length).toBeGreaterThan(0);
      all.push(e);
      at += e.length;
    }
  }
  return all;
}

/** The backend reads as the model, and every extent claiming zero (or hole) is zero in the model. */
export async function expectMatchesModel(backend: Backend, model: Buffer): Promise<void> {
  expect((await backend.read(0, backend.size)).equals(model)).toBe(true);
  let at = 0;
  for (const e of await fullStatus(backend)) {
    if (e.zero || e.hole) {
      const slice = model.subarray(at, at + e.length);
      expect(slice.equals(Buffer.alloc(e.length)), `extent at ${at}+${e.length} claims zero`).toBe(true);
    }
    at += e.length;
  }
  expect(at).toBe(backend.size);
}
