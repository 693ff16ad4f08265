/**
 * nbdd attach in the VM: a filesystem round trip on a qcow2 and a raw image (mkfs, mount, write,
 * sync, unmount, detach; the image checks clean; a second attach reads the files back); then a
 * partitioned image (partitions there when attach returns, unless --no-partitions), detach
 * refused while a partition is mounted or open (and done with --force), and READY=1 from
 * `attach --foreground` sent only once the device and its partitions are usable.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { runStatus } from '../helpers/tools.js';
import { Scenario } from './scenario.js';

let s: Scenario;

beforeAll(async () => {
  s = await Scenario.run(`
# roundtrip TAG IMAGE [attach options...]: writes files through ext4, detaches, re-attaches, reads them.
roundtrip() {
  local tag=$1 img=$2; shift 2
  local dev; dev=$(nbdd attach "$img" --driver nbd --name "$tag" --json "$@") || return 1
  echo "$dev" > $WORK/$tag.attach1.json
  # The daemon's threads' task flags (/proc/PID/task/TID/stat field 9): PR_SET_IO_FLUSHER shows as PF_MEMALLOC_NOIO.
  local pid; pid=$(sed -n 's/.*"pid":\\([0-9]*\\).*/\\1/p' $WORK/$tag.attach1.json)
  for t in /proc/$pid/task/*; do cut -d' ' -f9 $t/stat; done > $WORK/$tag.task-flags
  dev=$(echo "$dev" | sed 's/.*"device":"\\([^"]*\\)".*/\\1/')
  nbdd bitmap add "$tag" b0 > $WORK/$tag.bitmap-add 2> $WORK/$tag.bitmap-add.err
  mkfs.ext4 -q "$dev" && mkdir -p /mnt/$tag && mount "$dev" /mnt/$tag || return 1
  head -c 3M /dev/urandom > /mnt/$tag/random; seq 1 200000 > /mnt/$tag/numbers
  mkdir /mnt/$tag/dir && echo "hello $tag" > /mnt/$tag/dir/greeting
  (cd /mnt/$tag && sha256sum random numbers dir/greeting) > $WORK/$tag.sums-written
  sync && umount /mnt/$tag || return 1
  # The sidecar of an attached device: status and the dirty bitmap, as backup tools read them.
  nbdd status "$tag" --json > $WORK/$tag.status.json 2> $WORK/$tag.status.err
  nbdinfo --map=qemu:dirty-bitmap:b0 --totals "nbd+unix:///$tag?socket=/run/nbdd/$tag/nbd.sock" > $WORK/$tag.dirty-totals 2> $WORK/$tag.dirty-totals.err
  nbdd list --json > $WORK/$tag.list.json
  local metrics; metrics=$(sed -n 's/.*"metrics":"\\([^"]*\\)".*/\\1/p' $WORK/$tag.attach1.json)
  [ -n "$metrics" ] && curl -sS "$metrics" > $WORK/$tag.metrics 2>&1
  nbdd detach "$tag"; echo $? > $WORK/$tag.detach.rc
  ls /run/nbdd/ > $WORK/$tag.run-after-detach
  cat /sys/block/\${dev#/dev/}/size > $WORK/$tag.size-after-detach
  cp /run/nbdd/$tag.log $WORK/$tag.daemon1.log
  if [ "\${img##*.}" = qcow2 ]; then qemu-img check --output=json "$img" > $WORK/$tag.check.json; echo $? > $WORK/$tag.check.rc; fi
  dev=$(nbdd attach "$img" --driver nbd --name "$tag") || return 1
  mount "$dev" /mnt/$tag || return 1
  (cd /mnt/$tag && sha256sum random numbers dir/greeting) > $WORK/$tag.sums-read
  umount /mnt/$tag && nbdd detach "$tag"
}
ip link set lo up # the VM boots with loopback down; --metrics listens on it
roundtrip qcow2 /tmp/disk.qcow2 --create 64M --metrics 127.0.0.1:0; echo $? > $WORK/qcow2.rc
truncate -s 64M /tmp/disk.raw
roundtrip raw /tmp/disk.raw --connections 2; echo $? > $WORK/raw.rc

# Partitions on attach, detach that refuses while in use, and READY=1 (sd_notify) from --foreground.
truncate -s 64M /tmp/parts.raw
printf 'label: gpt\n,24M\n,\n' | sfdisk -q /tmp/parts.raw > $WORK/sfdisk.out 2>&1
qemu-img convert -O qcow2 /tmp/parts.raw /tmp/parts.qcow2
dev=$(nbdd attach /tmp/parts.qcow2 --driver nbd --name parts --no-partitions)
ls /dev | grep "^\${dev#/dev/}p" > $WORK/parts.noscan
nbdd detach parts
dev=$(nbdd attach /tmp/parts.qcow2 --driver nbd --name parts)
ls /dev | grep "^\${dev#/dev/}p" > $WORK/parts.scan
mkfs.ext4 -q \${dev}p1 && mkdir -p /mnt/p1 && mount \${dev}p1 /mnt/p1 && echo part-data > /mnt/p1/f
record detach-mounted nbdd detach parts
cat /mnt/p1/f > $WORK/parts.still-readable
umount /mnt/p1
exec 7< \${dev}p2
record detach-open nbdd detach parts
exec 7<&-
echo $$ > $WORK/parts.shell-pid
mount \${dev}p1 /mnt/p1
record detach-force nbdd detach parts --force
umount -l /mnt/p1
ls /run/nbdd > $WORK/parts.run-after-force
node $REPO/test/kernel/notify-listen.mjs /tmp/notify.sock $WORK/notify.json & lp=$!
for i in $(seq 100); do [ -e $WORK/notify.json.bound ] && break; sleep 0.1; done
NOTIFY_SOCKET=/tmp/notify.sock nbdd attach /tmp/parts.qcow2 --driver nbd --name sd --foreground > $WORK/sd.out 2> $WORK/sd.err & ap=$!
wait $lp
nbdd detach sd; wait $ap; echo $? > $WORK/sd.rc
`);
}, 1_800_000); // may wait for other VM runs (one at a time)

describe.each(['qcow2', 'raw'])('%s image through /dev/nbdN', (tag) => {
  it('attaches, prints the device as JSON and lists it', () => {
    expect(s.status(tag), s.log).toBe(0);
    const a = s.json<{ device: string; index: number; name: string; pid: number; reattached: boolean }>(`${tag}.attach1.json`);
    expect(a).toMatchObject({ device: `/dev/nbd${a.index}`, name: tag, reattached: false });
    const listed = s.json<{ device: string; state: string; sizeBytes: number; name: string; daemonPid: number; image: string }[]>(`${tag}.list.json`);
    expect(listed.find((d) => d.device === a.device)).toMatchObject({ state: 'connected', sizeBytes: 64 << 20, name: tag, daemonPid: a.pid, image: `/tmp/disk.${tag}` });
  });

  it('publishes block status and a dirty bitmap on its sidecar while attached', () => {
    expect(s.text(`${tag}.bitmap-add.err`)).not.toMatch(/nbdd: /);
    expect(s.text(`${tag}.status.err`)).not.toMatch(/nbdd: /);
    const status = s.json<Record<string, unknown>>(`${tag}.status.json`);
    expect(JSON.stringify(status)).toContain('/dev/nbd');
    // nbdinfo --totals: "bytes percent type description" per flag value; mkfs and the files dirtied some.
    const dirty = s.text(`${tag}.dirty-totals`).split('\n').find((l) => /\bdirty\b/.test(l) && !/clean/.test(l));
    expect(dirty, s.text(`${tag}.dirty-totals`) + s.text(`${tag}.dirty-totals.err`)).toBeDefined();
    expect(Number(dirty!.trim().split(/\s+/)[0])).toBeGreaterThan(3 << 20);
    const listed = s.json<{ name: string; sidecar: string | null }[]>(`${tag}.list.json`);
    expect(listed.find((d) => d.name === tag)?.sidecar).toBe(`/run/nbdd/${tag}`);
  });

  it('detaches cleanly: exit 0, state removed, device empty, daemon logged the close', () => {
    expect(s.text(`${tag}.detach.rc`).trim()).toBe('0');
    expect(s.text(`${tag}.run-after-detach`)).not.toMatch(/\.json/);
    expect(s.text(`${tag}.size-after-detach`).trim()).toBe('0');
    expect(s.text(`${tag}.daemon1.log`)).toMatch(/detached; \/tmp\/disk\.\w+ closed/);
  });

  it('reads back after a second attach what it wrote before', () => {
    const written = s.text(`${tag}.sums-written`);
    expect(written.split('\n').filter(Boolean)).toHaveLength(3);
    expect(s.text(`${tag}.sums-read`)).toBe(written);
  });
});

it('attach --metrics serves Prometheus metrics of the device that promtool accepts', () => {
  const attached = s.json<{ metrics?: string }>('qcow2.attach1.json');
  expect(attached.metrics).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  const text = s.text('qcow2.metrics');
  const writes = /^nbdd_requests_total\{op="write",device="qcow2"\} (\d+)$/m.exec(text);
  expect(writes, text.slice(0, 2000)).not.toBeNull();
  expect(Number(writes![1])).toBeGreaterThan(10); // mkfs and 3 MiB of files
  expect(text).toMatch(/^nbdd_device_info\{frontend="kernel-nbd",kind="qcow2",path="\/dev\/nbd\d+",read_only="false",device="qcow2"\} 1$/m);
  expect(text).toMatch(/^nbdd_bitmap_dirty_bytes\{bitmap="b0",device="qcow2"\} [1-9]\d*$/m);
  const lint = runStatus('promtool', ['check', 'metrics'], { input: text });
  expect(lint.status, lint.stdout + lint.stderr).toBe(0);
});

it('the attach daemon runs its event loop and all 16 libuv pool threads as I/O flushers (PR_SET_IO_FLUSHER)', () => {
  const PF_MEMALLOC_NOIO = 0x80000;
  const flags = s.text('qcow2.task-flags').trim().split('\n').map(Number);
  expect(flags.filter((f) => (f & PF_MEMALLOC_NOIO) !== 0).length, s.text('qcow2.task-flags')).toBeGreaterThanOrEqual(1 + 16);
  expect(s.text('qcow2.daemon1.log')).not.toMatch(/PR_SET_IO_FLUSHER/); // no refusal warning
});

it('qcow2 image passes qemu-img check after detach', () => {
  expect(s.text('qcow2.check.rc').trim(), s.text('qcow2.check.json')).toBe('0');
  const check = s.json<{ 'check-errors': number; corruptions?: number; leaks?: number }>('qcow2.check.json');
  expect(check['check-errors']).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
  expect(check.leaks ?? 0).toBe(0);
});

describe('a partitioned image', () => {
  it('shows its partitions as soon as attach returns, and none with --no-partitions', () => {
    expect(s.text('sfdisk.out')).toBe('');
    expect(s.text('parts.scan').trim().split('\n')).toEqual([expect.stringMatching(/^nbd\d+p1$/), expect.stringMatching(/^nbd\d+p2$/)]);
    expect(s.text('parts.noscan').trim()).toBe('');
  });

  it('refuses to detach while a partition is mounted or open, naming the holder', () => {
    expect(s.status('detach-mounted')).not.toBe(0);
    expect(s.text('detach-mounted.err')).toMatch(/\/dev\/nbd\d+ is in use: \/dev\/nbd\d+p1 is mounted on \/mnt\/p1\. .*--force/);
    expect(s.text('parts.still-readable')).toBe('part-data\n');
    expect(s.status('detach-open')).not.toBe(0);
    const shell = s.text('parts.shell-pid').trim();
    expect(s.text('detach-open.err')).toMatch(new RegExp(`/dev/nbd\\d+p2 is open in pid ${shell} \\(bash\\)`));
  });

  it('detaches a mounted device with --force', () => {
    expect(s.status('detach-force'), s.text('detach-force.err')).toBe(0);
    expect(s.text('parts.run-after-force')).not.toMatch(/^parts(\.json)?$/m);
    expect(s.text('parts.run-after-force')).not.toMatch(/\.json/);
  });

  it('sends READY=1 from attach --foreground only once the device and its partitions are usable', () => {
    const msgs = s.json<{ fields: Record<string, string>; device?: string; sizeSectors?: number; partitions?: string[]; nodes?: string[] }[]>('notify.json');
    const ready = msgs.find((m) => m.fields.READY === '1');
    expect(ready, JSON.stringify(msgs) + s.text('sd.err')).toBeDefined();
    expect(ready!.fields.STATUS).toMatch(/^serving \/dev\/nbd\d+ \(sd\)$/);
    expect(Number(ready!.fields.MAINPID)).toBeGreaterThan(1);
    expect(ready!.sizeSectors).toBe((64 << 20) / 512);
    expect(ready!.nodes).toEqual([`${ready!.device}p1`, `${ready!.device}p2`]);
    expect(s.text('sd.rc').trim()).toBe('0');
  });
});
