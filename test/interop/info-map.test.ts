/**
 * `nbdd info` and `nbdd map` (bin/nbdd, built by the global setup) against nbdinfo and qemu-img
 * on the same exports and images: nbdkit, qemu-nbd (qcow2 with allocation depth and a dirty
 * bitmap) and nbd-server.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client/client.js';
import { parseNbdUri } from '../../src/nbd/uri.js';
import { NBDD, runStatus } from '../helpers/tools.js';
import { requireTool, run, startNbdServer, startNbdkit, startQemuNbd, tempDir, type Peer } from './nbd-peers.js';

const MiB = 1024 * 1024;

function nbdd(...args: string[]): string {
  return run(NBDD, args);
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

const dir = tempDir('nbdd-info-map-');
const peers: Peer[] = [];
let qcow2: string;
let qemu: Peer;
let kit: Peer;

beforeAll(async () => {
  for (const tool of ['nbdinfo', 'qemu-img', 'qemu-io']) requireTool(tool);
  qcow2 = join(dir.path, 'img.qcow2');
  run('qemu-img', ['create', '-f', 'qcow2', qcow2, '16M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 128k', '-c', 'write -z 1M 64k', qcow2]);
  run('qemu-img', ['bitmap', '--add', '-g', '65536', qcow2, 'b0']);
  // Whole clusters only: within a data cluster qemu may also consult the host file, and a fresh
  // cluster written in part has an unwritten tail that ext4 calls a hole unless its pages are in
  // the page cache. Whether qemu-nbd then says "data" or "data, zero" for that tail depends on
  // what else read the file before; nbdd answers from the qcow2 metadata alone ("data").
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xcd 2M 64k', '-c', 'write -P 0xef 5M 64k', qcow2]);
  qemu = await startQemuNbd(dir.path, 'exp', ['-r', '-f', 'qcow2', '-A', '-B', 'b0', '-D', 'qcow2 over qemu-nbd', qcow2]);
  peers.push(qemu);
  kit = await startNbdkit(dir.path, ['memory', '32M']);
  peers.push(kit);
  // Some data, a trimmed hole inside it, and zeroes, written through our client.
  const u = parseNbdUri(kit.uri);
  const client = await NbdClient.connect(u.transport, { exportName: u.exportName });
  await client.write(MiB, Buffer.alloc(3 * MiB, 0x11));
  await client.trim(2 * MiB, 512 * 1024);
  await client.writeZeroes(8 * MiB, MiB, { noHole: true });
  await client.close();
});

afterAll(async () => {
  const stops = await Promise.allSettled(peers.map((p) => p.stop()));
  dir.remove();
  for (const s of stops) if (s.status === 'rejected') throw s.reason;
});

describe('nbdd map', () => {
  it.each(['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0'])('prints %s on qemu-nbd exactly as nbdinfo --map does', (context) => {
    expect(nbdd('map', '--context', context, qemu.uri)).toBe(run('nbdinfo', [`--map=${context}`, qemu.uri]));
    expect(JSON.parse(nbdd('map', '--json', '--context', context, qemu.uri))).toEqual(JSON.parse(run('nbdinfo', [`--map=${context}`, '--json', qemu.uri])));
  });

  it('prints nbdkit memory extents as nbdinfo does', () => {
    const ours = JSON.parse(nbdd('map', '--json', kit.uri)) as MapEntry[];
    expect(ours).toEqual(JSON.parse(run('nbdinfo', ['--map', '--json', kit.uri])));
    expect(ours.map((e) => e.description)).toContain('data');
    expect(ours.map((e) => e.description)).toContain('hole,zero');
  });

  it('maps a local qcow2 image like nbdinfo over qemu-nbd and like qemu-img map (host offsets aside)', () => {
    expect(JSON.parse(nbdd('map', '--json', qcow2))).toEqual(JSON.parse(run('nbdinfo', ['--map', '--json', qemu.uri])));
    expect(nbdd('map', '--context', 'qemu:allocation-depth', qcow2)).toBe(run('nbdinfo', ['--map=qemu:allocation-depth', qemu.uri]));
    const qemuMap = (JSON.parse(run('qemu-img', ['map', '--output=json', '-U', qcow2])) as Record<string, unknown>[]).map(({ offset: _offset, ...rest }) => rest);
    expect(JSON.parse(nbdd('map', '--qemu-json', qcow2))).toEqual(qemuMap);
  });

  it('refuses a context the target cannot give, with a message', () => {
    const r = runStatus(NBDD, ['map', '--context', 'qemu:dirty-bitmap:nope', qemu.uri]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/qemu:dirty-bitmap:nope is not available/);
  });
});

describe('nbdd info', () => {
  /** nbdinfo --json's export entry, minus what we do not report (content sniffing, size string). */
  function nbdinfoExport(uri: string): Record<string, unknown> {
    const j = JSON.parse(run('nbdinfo', ['--json', uri])) as { exports: Record<string, unknown>[] };
    const { content: _content, 'export-size-str': _sizeStr, ...rest } = j.exports[0]!;
    return rest;
  }

  it('reports a qemu-nbd export with the same fields and values as nbdinfo --json', () => {
    const info = JSON.parse(nbdd('info', '--json', qemu.uri));
    expect(info).toMatchObject({ format: 'nbd', size: 16 * MiB, readOnly: true });
    expect(info.nbd).toMatchObject({ ...nbdinfoExport(qemu.uri), protocol: 'newstyle-fixed', structured: true, entry: 'go' });
    const totals = (JSON.parse(run('nbdinfo', ['--map', '--json', qemu.uri])) as MapEntry[]).reduce(
      (s, e) => ({ hole: s.hole + (e.type & 1 ? e.length : 0), zero: s.zero + (e.type & 2 ? e.length : 0) }),
      { hole: 0, zero: 0 },
    );
    expect(info.allocation).toEqual({ allocated: 16 * MiB - totals.hole, hole: totals.hole, zero: totals.zero, data: 16 * MiB - totals.zero });
    expect(nbdd('info', qemu.uri)).toMatch(/meta contexts: base:allocation, qemu:allocation-depth, qemu:dirty-bitmap:b0/);
  });

  it('reports an nbdkit export as nbdinfo does', () => {
    const info = JSON.parse(nbdd('info', '--json', kit.uri));
    expect(info.nbd).toMatchObject(nbdinfoExport(kit.uri));
    expect(info.allocation.allocated).toBeGreaterThanOrEqual(3 * MiB - 512 * 1024);
    expect(info.allocation.allocated + info.allocation.hole).toBe(32 * MiB);
  });

  it('reports a local qcow2 image with its format details and allocation', () => {
    const info = JSON.parse(nbdd('info', '--json', qcow2));
    expect(info).toMatchObject({ format: 'qcow2', size: 16 * MiB, readOnly: false });
    expect(info.details).toMatchObject({ format: 'qcow2', clusterSize: 65536, bitmaps: [{ name: 'b0', granularity: 65536 }] });
    // Data clusters: 128k at 0, 64k at 2M, one 64k cluster for the 4k write at 5M.
    expect(info.allocation).toMatchObject({ data: 256 * 1024 });
  });

  it('reports nbd-server (no structured replies) without block status', async () => {
    const file = join(dir.path, 'n.raw');
    writeFileSync(file, Buffer.alloc(2 * MiB, 1));
    const server = await startNbdServer(dir.path, { exp: [`exportname = ${file}`] });
    peers.push(server);
    const info = JSON.parse(nbdd('info', '--json', server.uri));
    expect(info).toMatchObject({ size: 2 * MiB, allocation: null });
    expect(info.nbd).toMatchObject({ structured: false, contexts: [], 'export-size': 2 * MiB });
    // nbdinfo --json reports export-size 0 here: it asks with NBD_OPT_INFO, which nbd-server 3.24
    // answers before opening the file. Flags agree.
    const theirs = nbdinfoExport(server.uri);
    for (const key of Object.keys(theirs).filter((k) => k.startsWith('can_') || k.startsWith('is_'))) expect(info.nbd[key]).toBe(theirs[key]);
    const r = runStatus(NBDD, ['map', server.uri]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/no structured replies/);
  });
});
