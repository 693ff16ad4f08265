/**
 * `nbdd map IMAGE|URI [--json | --qemu-json] [--context NAME]`: the extents of an image or NBD
 * export, as `nbdinfo --map` prints them (text, or `--json` with the same fields), or as
 * `qemu-img map --output=json` does (`--qemu-json`: start, length, depth, present, zero, data).
 *
 * Contexts: `base:allocation` (default) and `qemu:allocation-depth` for every target; for URIs any
 * context the server offers (e.g. `qemu:dirty-bitmap:b0`).
 *
 * Also exports what `nbdd info` shares: opening a target (`openTarget`) and walking status.
 */
import { ALLOW_REMOTE_BACKING_HELP } from './options.js';
import { Command, Option } from 'commander';
import { allData, type Backend, type Extent } from '../core/backend.js';
import { Errno, NbddError } from '../core/errors.js';
import type { StatusExtent } from '../core/meta-context.js';
import { openNbd } from '../backends/nbd.js';
import { FORMATS, openImage, type Format } from '../backends/open.js';
import { NbdClient } from '../nbd/client/client.js';
import { BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, allocationFlags, depthOf, isDirtyBitmapContext } from '../nbd/wire/contexts.js';
import { isNbdUri, parseNbdUri, type NbdUri } from '../nbd/uri.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/wire/constants.js';

/** Bytes asked per status request for local images (NBD requests are capped by the client). */
const STATUS_STEP = 1 << 30;

/** An opened image or export. `client` and `uri` are set for NBD URIs. */
export interface Target {
  name: string;
  backend: Backend;
  client?: NbdClient;
  uri?: NbdUri;
  close(): Promise<void>;
}

/**
 * Opens IMAGE (path, memory:SIZE) read-only through `openImage`, or an NBD URI with one
 * connection selecting base:allocation, qemu:allocation-depth and `extraContexts`.
 */
export async function openTarget(target: string, options: { format?: Format; extraContexts?: string[]; listContexts?: boolean; allowRemoteBacking?: boolean } = {}): Promise<Target> {
  if (!isNbdUri(target)) {
    const backend = await openImage(target, { format: options.format, readOnly: true, allowRemoteBacking: options.allowRemoteBacking, reconnectDelayMs: 0 });
    return { name: target, backend, close: () => backend.close() };
  }
  const backend = await openNbd(target, { readOnly: true, extraContexts: options.extraContexts, listContexts: options.listContexts });
  return { name: target, backend, client: backend.primary, uri: parseNbdUri(target), close: () => backend.close() };
}

/** Reads status for one context from `offset`: consecutive extents, at least one byte. */
export type StatusSource = (offset: number, length: number) => Promise<StatusExtent[]>;

/** The status source for `context` on `t`; throws ENOTSUP when the target cannot give it. */
export function statusSource(t: Target, context: string): StatusSource {
  const fromBackend = (flagsOf: (e: Extent) => number): StatusSource => async (o, l) =>
    (await backendExtents(t.backend, o, l)).map((e) => ({ length: e.length, flags: flagsOf(e) }));
  if (t.client) {
    if (context === BASE_ALLOCATION && t.client.info.contexts.has(BASE_ALLOCATION)) return fromBackend(allocationFlags);
    if (!t.client.info.contexts.has(context)) {
      const why = t.client.info.structuredReplies ? 'does not offer it' : 'has no structured replies';
      throw new NbddError(Errno.ENOTSUP, `meta context ${context} is not available: the NBD server ${why}`);
    }
    return async (o, l) => (await t.client!.blockStatus(o, l)).get(context)!;
  }
  if (context === BASE_ALLOCATION) return fromBackend(allocationFlags);
  if (context === QEMU_ALLOCATION_DEPTH) return fromBackend(depthOf);
  throw new NbddError(Errno.ENOTSUP, `meta context ${context} is only available from NBD servers (serve the image with nbdd serve and map its URI)`);
}

async function backendExtents(b: Backend, offset: number, length: number): Promise<Extent[]> {
  if (!b.caps.blockStatus || !b.blockStatus) return allData(length);
  return b.blockStatus(offset, length);
}

/**
 * Walks `[0, size)` with `next(offset, remaining)` and calls `emit` for every extent, clipped to
 * the size. Throws EPROTO if a source makes no progress.
 */
async function walk<T extends { length: number }>(size: number, next: (offset: number, length: number) => Promise<T[]>, emit: (offset: number, e: T, length: number) => void): Promise<void> {
  let at = 0;
  while (at < size) {
    const extents = await next(at, Math.min(size - at, STATUS_STEP));
    if (extents.length === 0) throw new NbddError(Errno.EPROTO, `block status at ${at} returned no extents`);
    for (const e of extents) {
      const length = Math.min(e.length, size - at);
      emit(at, e, length);
      at += length;
      if (at >= size) break;
    }
  }
}

export interface MapExtent {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

/** Every extent of one context over the whole target, neighbours with equal type merged. */
export async function mapStatus(t: Target, context: string): Promise<MapExtent[]> {
  const source = statusSource(t, context);
  const out: MapExtent[] = [];
  await walk(t.backend.size, source, (offset, e, length) => {
    const last = out[out.length - 1];
    if (last && last.type === e.flags) last.length += length;
    else out.push({ offset, length, type: e.flags, ...describe(context, e.flags) });
  });
  return out;
}

/** nbdinfo's descriptions of context values (omitted for contexts it does not know). */
function describe(context: string, type: number): { description?: string } {
  if (context === BASE_ALLOCATION) {
    const parts = [type & NBD_STATE_HOLE ? 'hole' : '', type & NBD_STATE_ZERO ? 'zero' : ''].filter(Boolean);
    return { description: parts.length ? parts.join(',') : 'data' };
  }
  if (context === QEMU_ALLOCATION_DEPTH) return { description: type === 0 ? 'absent' : type === 1 ? 'local' : `backing depth ${type}` };
  if (isDirtyBitmapContext(context)) return { description: type & 1 ? 'dirty' : 'clean' };
  return {};
}

/** One entry of `qemu-img map --output=json` (without host offsets). */
export interface QemuMapEntry {
  start: number;
  length: number;
  /** Layer holding the data, 0 = this image (qemu-img's numbering: allocation-depth − 1). */
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

/** The target's extents in qemu-img map's JSON shape, merged like qemu-img merges them. */
export async function mapQemu(t: Target): Promise<QemuMapEntry[]> {
  const out: QemuMapEntry[] = [];
  await walk(t.backend.size, (o, l) => backendExtents(t.backend, o, l), (start, e, length) => {
    const depth = depthOf(e);
    const entry = { start, length, depth: Math.max(0, depth - 1), present: depth > 0, zero: e.zero, data: depth > 0 && !e.zero };
    const last = out[out.length - 1];
    const same = last && last.depth === entry.depth && last.present === entry.present && last.zero === entry.zero && last.data === entry.data;
    if (same) last.length += length;
    else out.push(entry);
  });
  return out;
}

/** Text like `nbdinfo --map`: offset, length, type, description. */
export function formatMapText(extents: MapExtent[]): string {
  return extents
    .map((e) => `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${String(e.type).padStart(3)}  ${e.description ?? ''}`.trimEnd() + '\n')
    .join('');
}

interface MapOptions {
  json?: boolean;
  qemuJson?: boolean;
  context: string;
  format: Format;
  allowRemoteBacking?: boolean;
}

export function register(program: Command): void {
  program
    .command('map')
    .description('print the extents (allocation, zero, depth, dirty) of an image or NBD export')
    .argument('<target>', 'image file, memory:SIZE, or NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)')
    .option('--json', 'JSON like nbdinfo --map --json')
    .option('--qemu-json', 'JSON like qemu-img map --output=json (allocation and depth)')
    .option('--context <name>', `meta context to map (${BASE_ALLOCATION}, ${QEMU_ALLOCATION_DEPTH}, qemu:dirty-bitmap:NAME for URIs)`, BASE_ALLOCATION)
    .addOption(new Option('-f, --format <format>', 'image format').choices([...FORMATS]).default('auto'))
    .option('--allow-remote-backing', ALLOW_REMOTE_BACKING_HELP)
    .action(async (targetName: string, opts: MapOptions) => {
      if (opts.json && opts.qemuJson) throw new NbddError(Errno.EINVAL, '--json and --qemu-json exclude each other');
      const t = await openTarget(targetName, { format: opts.format, extraContexts: [opts.context], allowRemoteBacking: opts.allowRemoteBacking });
      try {
        if (opts.qemuJson) {
          const entries = await mapQemu(t);
          process.stdout.write(`[${entries.map((e) => JSON.stringify(e)).join(',\n')}]\n`);
          return;
        }
        const extents = await mapStatus(t, opts.context);
        process.stdout.write(opts.json ? `${JSON.stringify(extents, null, 2)}\n` : formatMapText(extents));
      } finally {
        await t.close();
      }
    });
}
