/**
 * `nbdd info IMAGE|URI [--json]`: size, format, read-only, an allocation summary from block
 * status, and for NBD URIs the export's flags, block sizes, description and meta contexts.
 *
 * JSON shape (stable; sections absent when they do not apply):
 *   { target, format, size, readOnly,
 *     allocation: { allocated, hole, zero, data } | null,   // bytes; null: no block status
 *     nbd?: { …nbdinfo --json's keys for one export… , protocol, structured, entry },
 *     details?: { format-specific, e.g. describeQcow2's result } }
 * The `nbd` section uses nbdinfo's key names verbatim so scripts can move between the two tools.
 */
import { ALLOW_REMOTE_BACKING_HELP } from './options.js';
import { constants as fsConstants } from 'node:fs';
import { access } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { formatSize } from '../core/units.js';
import { FORMATS, isMemorySpec, remoteBackingOpener, type Format } from '../backends/open.js';
import { describeQcow2 } from '../backends/qcow2/describe.js';
import type { NbdClient } from '../nbd/client/client.js';
import { BASE_ALLOCATION } from '../nbd/wire/contexts.js';
import { formatNbdUri, type NbdUri } from '../nbd/uri.js';
import { NBD_FLAG, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/wire/constants.js';
import { mapStatus, openTarget, type Target } from './map.js';

export interface AllocationSummary {
  /** Bytes allocated (not a hole); `allocated + hole = size`. */
  allocated: number;
  hole: number;
  /** Bytes that read as zeroes (allocated or not); `zero + data = size`. */
  zero: number;
  data: number;
}

export interface ImageInfo {
  target: string;
  format: string;
  size: number;
  readOnly: boolean;
  allocation: AllocationSummary | null;
  nbd?: NbdExportInfo;
  details?: object;
}

/** One export as `nbdinfo --json` names its fields, plus how we negotiated. */
export interface NbdExportInfo {
  'export-name': string;
  description?: string;
  uri: string;
  contexts: string[];
  is_rotational: boolean;
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  'export-size': number;
  protocol: 'newstyle-fixed' | 'newstyle';
  structured: boolean;
  /** How the transmission phase was entered: NBD_OPT_GO, or the NBD_OPT_EXPORT_NAME fallback. */
  entry: 'go' | 'export-name';
}

function nbdExportInfo(client: NbdClient, uri: NbdUri): NbdExportInfo {
  const i = client.info;
  const has = (f: number): boolean => client.has(f);
  return {
    'export-name': i.name,
    ...(i.description ? { description: i.description } : {}),
    uri: formatNbdUri(uri),
    contexts: i.offeredContexts ?? [...i.contexts.keys()],
    is_rotational: has(NBD_FLAG.ROTATIONAL),
    is_read_only: has(NBD_FLAG.READ_ONLY),
    can_cache: has(NBD_FLAG.SEND_CACHE),
    can_df: has(NBD_FLAG.SEND_DF),
    can_fast_zero: has(NBD_FLAG.SEND_FAST_ZERO),
    can_flush: has(NBD_FLAG.SEND_FLUSH),
    can_fua: has(NBD_FLAG.SEND_FUA),
    can_multi_conn: has(NBD_FLAG.CAN_MULTI_CONN),
    can_trim: has(NBD_FLAG.SEND_TRIM),
    can_zero: has(NBD_FLAG.SEND_WRITE_ZEROES),
    ...(i.blockSizes
      ? { block_size_minimum: i.blockSizes.minimum, block_size_preferred: i.blockSizes.preferred, block_size_maximum: i.blockSizes.maximum }
      : {}),
    'export-size': i.size,
    protocol: i.handshakeFlags & 1 ? 'newstyle-fixed' : 'newstyle',
    structured: i.structuredReplies,
    entry: i.entry,
  };
}

/** Sums base:allocation over the whole target; null when the target has no block status. */
export async function allocationSummary(t: Target): Promise<AllocationSummary | null> {
  if (t.client ? !t.client.info.contexts.has(BASE_ALLOCATION) : !t.backend.blockStatus) return null;
  const sum: AllocationSummary = { allocated: 0, hole: 0, zero: 0, data: 0 };
  for (const e of await mapStatus(t, BASE_ALLOCATION)) {
    if (e.type & NBD_STATE_HOLE) sum.hole += e.length;
    else sum.allocated += e.length;
    if (e.type & NBD_STATE_ZERO) sum.zero += e.length;
    else sum.data += e.length;
  }
  return sum;
}

/** True when this process may write the file (memory: images are always writable). */
async function writable(path: string): Promise<boolean> {
  if (isMemorySpec(path)) return true;
  return access(path, fsConstants.W_OK).then(
    () => true,
    () => false,
  );
}

/** Everything `nbdd info` reports about `target` (a path, memory:SIZE or NBD URI). */
export async function imageInfo(target: string, format: Format = 'auto', allowRemoteBacking = false): Promise<ImageInfo> {
  const t = await openTarget(target, { format, listContexts: true, allowRemoteBacking });
  let info: ImageInfo;
  try {
    info = {
      target,
      format: t.backend.kind,
      size: t.backend.size,
      readOnly: t.client ? t.client.has(NBD_FLAG.READ_ONLY) : !(await writable(target)),
      allocation: await allocationSummary(t),
    };
    if (t.client && t.uri) info.nbd = nbdExportInfo(t.client, t.uri);
  } finally {
    await t.close();
  }
  if (info.format === 'qcow2') info.details = await describeQcow2(target, { openRemote: remoteBackingOpener({ allowRemoteBacking, reconnectDelayMs: 0 }) });
  return info;
}

function yesNo(b: boolean): string {
  return b ? 'yes' : 'no';
}

/** Human-readable `nbdd info`. */
export function formatInfoText(i: ImageInfo): string {
  const lines = [`target: ${i.target}`, `format: ${i.format}`, `virtual size: ${i.size} (${formatSize(i.size)})`];
  lines.push(`read-only: ${yesNo(i.readOnly)}`);
  if (i.allocation) {
    const a = i.allocation;
    lines.push(`allocation: ${a.allocated} allocated, ${a.hole} hole; ${a.data} data, ${a.zero} zero (bytes)`);
  } else lines.push('allocation: unknown (no block status)');
  const n = i.nbd;
  if (n) {
    lines.push(`nbd export: '${n['export-name']}'${n.description ? ` (${n.description})` : ''}`);
    lines.push(`  uri: ${n.uri}`);
    lines.push(`  protocol: ${n.protocol}, ${n.structured ? 'structured replies' : 'simple replies'}, opened with ${n.entry === 'go' ? 'NBD_OPT_GO' : 'NBD_OPT_EXPORT_NAME'}`);
    const can = Object.entries(n)
      .filter(([k, v]) => k.startsWith('can_') && v === true)
      .map(([k]) => k.slice(4).replace(/_/g, '-'));
    lines.push(`  can: ${can.join(' ') || 'none'}${n.is_rotational ? ' (rotational)' : ''}`);
    if (n.block_size_minimum !== undefined) {
      lines.push(`  block sizes: minimum ${n.block_size_minimum}, preferred ${n.block_size_preferred}, maximum ${n.block_size_maximum}`);
    }
    lines.push(`  meta contexts: ${n.contexts.join(', ') || 'none'}`);
  }
  if (i.details) {
    lines.push('format details:');
    for (const [k, v] of Object.entries(i.details)) lines.push(`  ${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  }
  return lines.join('\n') + '\n';
}

export function register(program: Command): void {
  program
    .command('info')
    .description('show size, format, allocation and (for NBD URIs) export details')
    .argument('<target>', 'image file, memory:SIZE, or NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)')
    .option('--json', 'machine-readable output')
    .addOption(new Option('-f, --format <format>', 'image format').choices([...FORMATS]).default('auto'))
    .option('--allow-remote-backing', ALLOW_REMOTE_BACKING_HELP)
    .action(async (target: string, opts: { json?: boolean; format: Format; allowRemoteBacking?: boolean }) => {
      const info = await imageInfo(target, opts.format, !!opts.allowRemoteBacking);
      process.stdout.write(opts.json ? `${JSON.stringify(info, null, 2)}\n` : formatInfoText(info));
    });
}
