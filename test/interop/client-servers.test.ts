/**
 * NbdClient against real servers: nbdkit (memory, file, read-only, delay), qemu-nbd (raw, qcow2
 * with allocation depth and a dirty bitmap) and nbd-server 3.24 (simple replies only). Block status
 * is compared with what nbdinfo reports for the same export.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { parseNbdUri } from '../../src/nbd/uri.js';
import { NBD_FLAG } from '../../src/nbd/wire/constants.js';
import { run, startNbdServer, startNbdkit, startQemuNbd, tempDir, type Peer } from './nbd-peers.js';

const MiB = 1024 * 1024;

function connect(uri: string, options: Parameters<typeof NbdClient.connect>[1] = {}): Promise<NbdClient> {
  const u = parseNbdUri(uri);
  return NbdClient.connect(u.transport, { exportName: u.exportName, ...options });
}

/** A buffer whose every 4-byte word is its own absolute offset xor `seed`: any misplacement shows. */
function pattern(offset: number, length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) b.writeUInt32BE(((offset + i) ^ seed) >>> 0, i);
  return b;
}

async function expectErrno(p: Promise<unknown>, errno: number): Promise<void> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(NbddError);
  expect((err as NbddError).code).toBe(new NbddError(errno, '').code);
}

interface NbdinfoExtent {
  offset: number;
  length: number;
  type: number;
}

/** Our extents for `context` over the whole export, merged like nbdinfo merges them. */
async function mapAll(client: NbdClient, context: string): Promise<NbdinfoExtent[]> {
  const out: NbdinfoExtent[] = [];
  let at = 0;
  while (at < client.size) {
    const extents = (await client.blockStatus(at, client.size - at)).get(context)!;
    for (const e of extents) {
      const length = Math.min(e.length, client.size - at);
      const last = out[out.length - 1];
      if (last && last.type === e.flags) last.length += length;
      else out.push({ offset: at, length, type: e.flags });
      at += length;
      if (at >= client.size) break;
    }
  }
  return out;
}

function nbdinfoMap(uri: string, context = 'base:allocation'): NbdinfoExtent[] {
  const raw = JSON.parse(run('nbdinfo', [`--map=${context}`, '--json', uri])) as NbdinfoExtent[];
  return raw.map(({ offset, length, type }) => ({ offset, length, type }));
}

const dir = tempDir();
const peers: Peer[] = [];
async function peer<T extends Peer>(p: Promise<T>): Promise<T> {
  const started = await p;
  peers.push(started);
  return started;
}

afterAll(async () => {
  const stops = await Promise.allSettled(peers.map((p) => p.stop()));
  dir.remove();
  for (const s of stops) if (s.status === 'rejected') throw s.reason;
});

describe('nbdkit memory', () => {
  let server: Peer;
  let client: NbdClient;
  beforeAll(async () => {
    server = await peer(startNbdkit(dir.path, ['memory', '64M']));
    client = await connect(server.uri, { metaContexts: ['base:allocation'], listMetaContexts: true });
  });
  afterAll(() => client?.close());

  it('negotiates GO, structured replies, base:allocation and the advertised flags', () => {
    const i = client.info;
    expect(i.size).toBe(64 * MiB);
    expect(i.entry).toBe('go');
    expect(i.structuredReplies).toBe(true);
    expect([...i.contexts.keys()]).toEqual(['base:allocation']);
    expect(i.offeredContexts).toEqual(['base:allocation']);
    for (const f of [NBD_FLAG.SEND_FLUSH, NBD_FLAG.SEND_FUA, NBD_FLAG.SEND_TRIM, NBD_FLAG.SEND_WRITE_ZEROES, NBD_FLAG.CAN_MULTI_CONN, NBD_FLAG.SEND_FAST_ZERO]) {
      expect(client.has(f)).toBe(true);
    }
    expect(client.has(NBD_FLAG.READ_ONLY)).toBe(false);
  });

  it('writes and reads back patterns with 128 requests in flight', async () => {
    const size = 64 * 1024;
    const offsets = Array.from({ length: 128 }, (_, i) => 3 * MiB + i * size * 2 + (i % 7) * 512);
    await Promise.all(offsets.map((o, i) => client.write(o, pattern(o, size, i), { fua: i % 2 === 0 })));
    const reads = await Promise.all(offsets.map((o) => client.read(o, size)));
    reads.forEach((data, i) => expect(data.equals(pattern(offsets[i]!, size, i))).toBe(true));
    await client.flush();
  });

  it('splits a 40 MiB write and read at the 32 MiB payload limit', async () => {
    const offset = 20 * MiB;
    const data = pattern(offset, 40 * MiB, 0x5a5a5a5a);
    await client.write(offset, data);
    const back = await client.read(offset, 40 * MiB);
    expect(back.equals(data)).toBe(true);
  });

  it('reports block status as nbdinfo does, and trim / write zeroes read back as zeroes', async () => {
    await client.trim(20 * MiB, MiB);
    await client.writeZeroes(22 * MiB, MiB, { fastZero: true });
    await client.writeZeroes(24 * MiB, 64 * 1024, { noHole: true, fua: true });
    expect((await client.read(20 * MiB, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
    expect((await client.read(22 * MiB, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
    expect((await client.read(24 * MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024))).toBe(true);
    const ours = await mapAll(client, 'base:allocation');
    expect(ours).toEqual(nbdinfoMap(server.uri));
    expect(ours.some((e) => e.type === 0)).toBe(true);
    expect(ours.some((e) => e.type === 3)).toBe(true);
    const one = (await client.blockStatus(0, client.size, { reqOne: true })).get('base:allocation')!;
    expect(one).toHaveLength(1);
  });

  it('turns server error replies into errnos and stays usable', async () => {
    const loose = await connect(server.uri, { strict: false, metaContexts: ['base:allocation'] });
    await expectErrno(loose.read(64 * MiB - 512, 1024), Errno.EINVAL);
    await expectErrno(loose.blockStatus(64 * MiB, 512), Errno.EINVAL);
    await expectErrno(loose.write(64 * MiB, Buffer.alloc(512)), Errno.ENOSPC);
    expect((await loose.read(0, 512)).length).toBe(512);
    await loose.close();
    // Strict mode refuses the same requests without sending them.
    await expectErrno(client.read(64 * MiB - 512, 1024), Errno.EINVAL);
  });

  it('lists the default export', async () => {
    const list = await NbdClient.list(parseNbdUri(server.uri).transport);
    expect(list.map((e) => e.name)).toEqual(['']);
  });
});

describe('nbdkit read-only file, delay, and a dying server', () => {
  it('reads a file through nbdkit file and gets EPERM for writes on a read-only export', async () => {
    const file = join(dir.path, 'file.raw');
    writeFileSync(file, pattern(0, 2 * MiB, 7));
    const server = await peer(startNbdkit(dir.path, ['-r', 'file', file]));
    const client = await connect(server.uri, { strict: false });
    expect(client.has(NBD_FLAG.READ_ONLY)).toBe(true);
    expect((await client.read(MiB - 4, 8)).equals(pattern(MiB - 4, 8, 7))).toBe(true);
    await expectErrno(client.write(0, Buffer.alloc(512)), Errno.EPERM);
    await client.close();
    const strict = await connect(server.uri);
    await expectErrno(strict.write(0, Buffer.alloc(512)), Errno.EPERM);
    await strict.close();
  });

  it('rejects every request in flight when the server goes away', async () => {
    const server = await startNbdkit(dir.path, ['--filter=delay', 'memory', '1M', 'rdelay=30']);
    const client = await connect(server.uri);
    const reads = [client.read(0, 4096), client.read(4096, 4096), client.read(8192, 4096)];
    await new Promise((r) => setTimeout(r, 200));
    expect(client.inFlight).toBe(3);
    // Attach every handler before the server goes: all three reject in the same turn.
    const checks = reads.map((r) => expectErrno(r, Errno.ECONNRESET));
    await server.kill();
    await Promise.all(checks);
    await expectErrno(client.read(0, 512), Errno.ECONNRESET);
  });
});

describe('qemu-nbd', () => {
  it('serves a raw file with block sizes, description and patterns', async () => {
    const file = join(dir.path, 'q.raw');
    run('qemu-img', ['create', '-f', 'raw', file, '8M']);
    const server = await peer(startQemuNbd(dir.path, 'raw export', ['-f', 'raw', '-D', 'a raw disk', file]));
    const client = await connect(server.uri, { metaContexts: ['base:allocation'] });
    expect(client.info.blockSizes).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
    expect(client.info.description).toBe('a raw disk');
    expect(client.info.canonicalName).toBe('raw export');
    await client.write(MiB + 3, pattern(MiB + 3, 70_000, 9));
    await client.flush();
    expect((await client.read(MiB + 3, 70_000)).equals(pattern(MiB + 3, 70_000, 9))).toBe(true);
    expect(await mapAll(client, 'base:allocation')).toEqual(nbdinfoMap(server.uri));
    await client.close();
  });

  it('offers qemu:allocation-depth and a dirty bitmap on a qcow2 image, as nbdinfo sees them', async () => {
    const img = join(dir.path, 'q.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', img, '16M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 128k', '-c', 'write -z 1M 64k', img]);
    run('qemu-img', ['bitmap', '--add', '-g', '65536', img, 'b0']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xcd 2M 64k', '-c', 'write -P 0xef 5M 4k', img]);
    const server = await peer(startQemuNbd(dir.path, 'exp', ['-r', '-f', 'qcow2', '-A', '-B', 'b0', img]));
    const contexts = ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0'];
    const client = await connect(server.uri, { metaContexts: contexts, listMetaContexts: true });
    expect([...client.info.contexts.keys()].sort()).toEqual(contexts);
    expect(client.info.offeredContexts!.sort()).toEqual(contexts);
    for (const c of contexts) expect(await mapAll(client, c)).toEqual(nbdinfoMap(server.uri, c));
    expect((await client.read(2 * MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024, 0xcd))).toBe(true);
    const read = await client.read(0, 3 * MiB);
    expect(read.subarray(0, 128 * 1024).equals(Buffer.alloc(128 * 1024, 0xab))).toBe(true);
    expect(read.subarray(128 * 1024, 2 * MiB).equals(Buffer.alloc(2 * MiB - 128 * 1024))).toBe(true);
    await client.close();
  });
});

describe('nbd-server 3.24', () => {
  it('works with simple replies only, lists exports and refuses writes to a read-only export', async () => {
    const file = join(dir.path, 'n.raw');
    writeFileSync(file, pattern(0, 4 * MiB, 3));
    const server = await peer(startNbdServer(dir.path, { rw: [`exportname = ${file}`, 'flush = true', 'fua = true'], ro: [`exportname = ${file}`, 'readonly = true'] }));
    const list = await NbdClient.list(parseNbdUri(server.uri).transport);
    expect(list.map((e) => e.name).sort()).toEqual(['ro', 'rw']);
    const client = await connect(server.exportUri('rw'), { metaContexts: ['base:allocation'] });
    expect(client.info.structuredReplies).toBe(false);
    expect(client.info.contexts.size).toBe(0);
    expect(client.size).toBe(4 * MiB);
    expect((await client.read(12345 * 4, 4000)).equals(pattern(12345 * 4, 4000, 3))).toBe(true);
    await Promise.all([0, 1, 2, 3].map((i) => client.write(i * MiB, pattern(i * MiB, 8192, 100 + i), { fua: true })));
    const back = await Promise.all([0, 1, 2, 3].map((i) => client.read(i * MiB, 8192)));
    back.forEach((b, i) => expect(b.equals(pattern(i * MiB, 8192, 100 + i))).toBe(true));
    await client.flush();
    await expectErrno(client.blockStatus(0, 512), Errno.EINVAL);
    await client.close();
    const ro = await connect(server.exportUri('ro'), { strict: false });
    expect(ro.has(NBD_FLAG.READ_ONLY)).toBe(true);
    await expectErrno(ro.write(0, Buffer.alloc(512)), Errno.EPERM);
    await ro.close();
  });
});
