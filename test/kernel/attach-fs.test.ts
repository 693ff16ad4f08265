/**
 * nbdd attach in the VM: a filesystem round trip on a qcow2 and a raw image (mkfs, mount, write,
 * sync, unmount, detach; the image checks clean; a second attach reads the files back).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

let s: Scenario;

beforeAll(async () => {
  s = await Scenario.run(`
# roundtrip TAG IMAGE [attach options...]: writes files through ext4, detaches, re-attaches, reads them.
roundtrip() {
  local tag=$1 img=$2; shift 2
  local dev; dev=$(nbdd attach "$img" --name "$tag" --json "$@") || return 1
  echo "$dev" > $WORK/$tag.attach1.json
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
  nbdd detach "$tag"; echo $? > $WORK/$tag.detach.rc
  ls /run/nbdd/ > $WORK/$tag.run-after-detach
  cat /sys/block/\${dev#/dev/}/size > $WORK/$tag.size-after-detach
  cp /run/nbdd/$tag.log $WORK/$tag.daemon1.log
  if [ "\${img##*.}" = qcow2 ]; then qemu-img check --output=json "$img" > $WORK/$tag.check.json; echo $? > $WORK/$tag.check.rc; fi
  dev=$(nbdd attach "$img" --name "$tag") || return 1
  mount "$dev" /mnt/$tag || return 1
  (cd /mnt/$tag && sha256sum random numbers dir/greeting) > $WORK/$tag.sums-read
  umount /mnt/$tag && nbdd detach "$tag"
}
roundtrip qcow2 /tmp/disk.qcow2 --create 64M; echo $? > $WORK/qcow2.rc
truncate -s 64M /tmp/disk.raw
roundtrip raw /tmp/disk.raw --connections 2; echo $? > $WORK/raw.rc
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

it('qcow2 image passes qemu-img check after detach', () => {
  expect(s.text('qcow2.check.rc').trim(), s.text('qcow2.check.json')).toBe('0');
  const check = s.json<{ 'check-errors': number; corruptions?: number; leaks?: number }>('qcow2.check.json');
  expect(check['check-errors']).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
  expect(check.leaks ?? 0).toBe(0);
});
