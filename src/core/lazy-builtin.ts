/**
 * Node built-in modules that only some daemons use, loaded on first use rather than imported with
 * the modules that may need them (docs/architecture.md, "Memory pressure"): every module imported
 * at start costs every daemon its heap, and an ESM import of a built-in reads all its exports
 * (for `tls`, the bundled CA list).
 */
import { createRequire } from 'node:module';

const requireBuiltin = createRequire(import.meta.url);

/** A function that returns the built-in module `name`, loading it on its first call. */
export function lazyBuiltin<T>(name: string): () => T {
  let mod: T | undefined;
  return () => (mod ??= requireBuiltin(name) as T);
}
