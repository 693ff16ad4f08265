/**
 * The sidecar against real NBD tools: nbdinfo reads qemu:dirty-bitmap maps from nbd.sock, nbdcopy
 * copies the fleecing export while the disk keeps changing, qemu-io releases ranges with TRIM.
 */
import net from 'node:net';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { BitmapSet } from '../../src/bitmaps/bitmap-set.js';
import { BlockQueue } from '../../src/core/queue.js';
import { ControlClient } from '../../src/control/control-client.js';
import { Sidecar } from '../../src/sidecar/sidecar.js';
import { buildStack } from '../../src/runtime/stack.js';
import { prng } from '../helpers/prng.js';
import { runAsync as run, runAsyncOk as runOk } from '../helpers/run-async.js';
import { requireTool } from '../helpers/tools.js';
import { TestBackend } from '../helpers/test-backend.js';

const MiB = 1024 * 1024;
const G = 65536;

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

beforeAll(() => ['nbdinfo', 'nbdcopy', 'qemu-io'].forEach(requireTool));

describe('sidecar nbd.sock and control.sock with real NBD tools', () => {
  let dir: string;
  let backend: TestBackend;
  let queue: BlockQueue;
  let bitmaps: BitmapSet;
  let sidecar: Sidecar;
  const uri = (exp: string) => `nbd+unix:///${exp}?socket=${sidecar.nbdSocket}`;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'nbdd-sc-'));
    backend = new TestBackend(16 * MiB);
    const pattern = Buffer.alloc(backend.size);
    for (let i = 0; i < backend.size; i += 4096) pattern.fill((i >> 12) & 0xff, i, i + 4096);
    await backend.write(0, pattern); // written, so block status calls it data
    bitmaps = await BitmapSet.open(backend.size, null);
    const stack = buildStack(backend, bitmaps);
    queue = stack.queue;
    sidecar = await Sidecar.start({ name: 'disk0', dir: join(dir, 'disk0'), stack });
  });
  afterEach(async () => {
    await sidecar.close();
    await queue.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('is a private directory with both sockets, read-only by default', async () => {
    expect(statSync(sidecar.dir).mode & 0o777).toBe(0o700);
    expect(statSync(sidecar.nbdSocket).isSocket()).toBe(true);
    expect(statSync(sidecar.controlSocket).mode & 0o777).toBe(0o600);
    expect((await run('nbdinfo', ['--is', 'read-only', uri('disk0')])).code).toBe(0);
  });

  it('nbdinfo --map=qemu:dirty-bitmap:b0 shows exactly the written granules', async () => {
    await bitmaps.add('b0', { granularity: G });
    await bitmaps.add('fine', { granularity: 4096 });
    await Promise.all([queue.write(100, Buffer.alloc(10)), queue.write(3 * MiB, Buffer.alloc(2 * G + 1)), queue.writeZeroes(16 * MiB - 4096, 4096)]);
    const info = JSON.parse(await runOk('nbdinfo', ['--json', uri('disk0')]));
    const contexts: string[] = info.exports[0].contexts;
    expect(contexts).toEqual(expect.arrayContaining(['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:fine']));
    const map = JSON.parse(await runOk('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:b0', uri('disk0')])) as MapEntry[];
    expect(map.map(({ offset, length, type }) => ({ offset, length, type }))).toEqual([
      { offset: 0, length: G, type: 1 },
      { offset: G, length: 3 * MiB - G, type: 0 },
      { offset: 3 * MiB, length: 3 * G, type: 1 },
      { offset: 3 * MiB + 3 * G, length: 13 * MiB - 4 * G, type: 0 },
      { offset: 16 * MiB - G, length: G, type: 1 },
    ]);
    const fine = JSON.parse(await runOk('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:fine', uri('disk0')])) as MapEntry[];
    expect(fine.filter((e) => e.type === 1).map((e) => [e.offset, e.length])).toEqual([
      [0, 4096],
      [3 * MiB, 2 * G + 4096],
      [16 * MiB - 4096, 4096],
    ]);
  });

  it('fleecing: nbdcopy of the backup export equals the disk at backup.begin while writes go on', async () => {
    await bitmaps.add('b0');
    await queue.write(5 * MiB, Buffer.alloc(G, 0x55));
    const snapshot = Buffer.from(backend.data);
    const ctl = await ControlClient.connect(sidecar.controlSocket);
    const events: any[] = [];
    ctl.onNotification = (_m, p) => events.push(p);
    await ctl.call('events.subscribe', { types: ['dirty'] });
    const begun = await ctl.call<{ export: string }>('backup.begin', { bitmap: 'b0', scratchMemoryBytes: 2 * MiB });
    expect(begun).toMatchObject({ export: 'disk0-backup', bitmap: 'b0', size: 16 * MiB });
    await expect(ctl.call('bitmap.clear', { name: 'b0' })).rejects.toMatchObject({ data: { errno: 'EBUSY' } });

    let writing = true;
    const rnd = prng(7);
    const r = { next: rnd, int: (n: number) => Math.floor(rnd() * n) };
    const writer = (async () => {
      let n = 0;
      while (writing) {
        const off = r.int(16 * MiB / 512 - 256) * 512;
        await Promise.all([queue.write(off, Buffer.alloc(512 * (1 + r.int(255)), 1 + r.int(254))), queue.trim(r.int(255) * G, G)]);
        n++;
        await new Promise((res) => setTimeout(res, 1));
      }
      return n;
    })();
    const out = join(dir, 'copy.raw');
    await runOk('nbdcopy', ['--request-size=262144', uri('disk0-backup'), out]);
    writing = false;
    const writes = await writer;
    expect(writes).toBeGreaterThan(5);
    expect(readFileSync(out).equals(snapshot)).toBe(true);
    expect(backend.data.equals(snapshot)).toBe(false);

    // The backup export's bitmap is the frozen one: only the granule written before begin.
    const frozen = JSON.parse(await runOk('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:b0', uri('disk0-backup')])) as MapEntry[];
    expect(frozen.filter((e) => e.type === 1).map((e) => [e.offset, e.length])).toEqual([[5 * MiB, G]]);
    // ... while the live one kept recording.
    const live = JSON.parse(await runOk('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:b0', uri('disk0')])) as MapEntry[];
    expect(live.filter((e) => e.type === 1).length).toBeGreaterThan(1);
    expect(events.some((e) => e.type === 'dirty' && e.extents.length > 0)).toBe(true);

    // TRIM from the backup client releases copied-out data.
    const before = (await ctl.call<any>('status')).backup;
    expect(before.copiedGranules).toBeGreaterThan(0);
    await runOk('qemu-io', ['-f', 'raw', '-c', `discard 0 ${16 * MiB}`, uri('disk0-backup')]);
    const after = (await ctl.call<any>('status')).backup;
    expect(after).toMatchObject({ copiedGranules: 0, releasedGranules: 256, broken: null });
    // Data writes on the backup export are refused.
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', uri('disk0-backup')])).code).not.toBe(0);

    await ctl.call('backup.end');
    expect((await run('nbdinfo', [uri('disk0-backup')])).code).not.toBe(0);
    await ctl.call('bitmap.clear', { name: 'b0' });
    await ctl.close();
  });

  it('survives garbage on nbd.sock and bad JSON on control.sock', async () => {
    const junk = net.connect(sidecar.nbdSocket);
    await new Promise((res) => junk.once('connect', res));
    junk.on('error', () => undefined);
    junk.resume(); // read (and drop) the greeting, so the close is seen
    junk.write(Buffer.alloc(4096, 0xa5));
    await new Promise((res) => junk.once('close', res));
    const ctl = net.connect(sidecar.controlSocket);
    ctl.setEncoding('utf8');
    let got = '';
    ctl.on('data', (d) => (got += d));
    ctl.write('{"jsonrpc":"2.0","id":1,"method":"bitmap.add","params":{"name":"x","granularity":1000}}\n{nope\n');
    await new Promise((res) => setTimeout(res, 100));
    const lines = got.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.map((l) => l.error.code)).toEqual([-32000, -32700]);
    ctl.destroy();
    expect((await run('nbdinfo', ['--size', uri('disk0')])).stdout.trim()).toBe(String(16 * MiB));
  });
});
