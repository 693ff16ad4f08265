/**
 * ublk in the VM (one boot): a filesystem round trip on qcow2 (queues on the event loop) and raw
 * (--queue-threads) through /dev/ublkbN (mkfs,
 * mount, write, fstrim, sync, unmount, the sidecar's dirty bitmap and block status, detach;
 * qemu-img check; a read-only re-attach reads the
 * same checksums and refuses writes), fio --verify over 2 queues and 2 jobs, blkdiscard and
 * blkdiscard -z reaching the raw backend as punch-hole / zero-range, recovery after the daemon is
 * killed mid-job (raw and qcow2), `nbdd list --json`, and the
 * partitions of a GPT image there when attach returns, detach refused while one is mounted, the
 * error paths: missing image, device id in use, not root, ublk_drv not loaded — each with a clear
 * message and no device left behind.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

let s: Scenario;

interface Listed {
  driver: string;
  device: string;
  state: string;
  name: string | null;
  daemonPid: number | null;
  queues: number | null;
  depth: number | null;
  sizeBytes: number;
  readOnly: boolean;
  image: string | null;
}

beforeAll(async () => {
  s = await Scenario.run(`
udevs() { ls /sys/class/ublk-char 2>/dev/null | wc -l; }
roundtrip() {
  local tag=$1 img=$2; shift 2
  local out dev
  # No --driver: ublk is the default where ublk_drv works (--driver auto)
  out=$(nbdd attach "$img" --name "$tag" --json "$@") || return 1
  echo "$out" > $WORK/$tag.attach.json
  dev=$(echo "$out" | sed 's/.*"device":"\\([^"]*\\)".*/\\1/')
  cat /sys/block/\${dev#/dev/}/queue/discard_max_bytes > $WORK/$tag.discard_max
  cat /sys/block/\${dev#/dev/}/queue/write_zeroes_max_bytes > $WORK/$tag.write_zeroes_max
  cat /sys/block/\${dev#/dev/}/queue/write_cache > $WORK/$tag.write_cache
  cat /sys/block/\${dev#/dev/}/queue/fua > $WORK/$tag.fua
  nbdd bitmap add "$tag" b0 > $WORK/$tag.bitmap-add 2> $WORK/$tag.bitmap-add.err
  mkfs.ext4 -q "$dev" && mkdir -p /mnt/$tag && mount "$dev" /mnt/$tag || return 1
  head -c 3M /dev/urandom > /mnt/$tag/random; seq 1 200000 > /mnt/$tag/numbers
  head -c 2M /dev/urandom > /mnt/$tag/gone
  sync; rm /mnt/$tag/gone
  fstrim -v /mnt/$tag > $WORK/$tag.fstrim 2>&1; echo $? > $WORK/$tag.fstrim.rc
  (cd /mnt/$tag && sha256sum random numbers) > $WORK/$tag.sums-written
  sync && umount /mnt/$tag || return 1
  # The sidecar of a ublk device: the dirty bitmap and block status, as backup tools read them.
  nbdinfo --map=qemu:dirty-bitmap:b0 --totals "nbd+unix:///$tag?socket=/run/nbdd/$tag/nbd.sock" > $WORK/$tag.dirty-totals 2> $WORK/$tag.dirty-totals.err
  nbdinfo --map --totals "nbd+unix:///$tag?socket=/run/nbdd/$tag/nbd.sock" > $WORK/$tag.alloc-totals 2>&1
  nbdd list --json > $WORK/$tag.list.json
  nbdd status "$tag" --json > $WORK/$tag.status.json
  node --input-type=module -e "
    const { controlCall } = await import('$REPO/dist/cli/control-call.js');
    console.log(JSON.stringify(await controlCall('$tag', 'stats')));
  " > $WORK/$tag.stats.json 2>&1
  nbdd detach "$tag"; echo $? > $WORK/$tag.detach.rc
  ls /run/nbdd/ > $WORK/$tag.run-after-detach
  udevs > $WORK/$tag.devices-after-detach
  cp /run/nbdd/$tag.log $WORK/$tag.daemon.log
  if [ "\${img##*.}" = qcow2 ]; then qemu-img check --output=json "$img" > $WORK/$tag.check.json; echo $? > $WORK/$tag.check.rc; fi
  dev=$(nbdd attach "$img" --driver ublk --name "$tag" --read-only) || return 1
  blockdev --getro $dev > $WORK/$tag.getro
  record $tag-ro-dd dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct
  mount -o ro "$dev" /mnt/$tag || return 1
  (cd /mnt/$tag && sha256sum random numbers) > $WORK/$tag.sums-read
  umount /mnt/$tag && nbdd detach "$tag"
}
roundtrip qcow2 /tmp/disk.qcow2 --create 64M; echo $? > $WORK/qcow2.rc
truncate -s 64M /tmp/disk.raw
roundtrip raw /tmp/disk.raw --queues 2 --queue-threads; echo $? > $WORK/raw.rc

# --- fio --verify with 2 queues and 2 jobs
truncate -s 64M fio.img
dev=$(nbdd attach fio.img --driver ublk --queues 2 --depth 64 --name fio)
ls /sys/block/\${dev#/dev/}/mq | wc -l > $WORK/fio.hwqueues
fio --name=v --filename=$dev --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite --numjobs=2 \\
  --size=16M --offset_increment=32M --verify=crc32c --verify_fatal=1 --group_reporting --output-format=json --output=$WORK/fio.json
echo $? > $WORK/fio.rc
fio --name=big --filename=$dev --direct=1 --ioengine=libaio --iodepth=4 --bs=1M --rw=write --size=32M \\
  --verify=crc32c --verify_fatal=1 --output-format=json --output=$WORK/fio-big.json
echo $? > $WORK/fio-big.rc
nbdd detach fio

# --- discard and write-zeroes reach the raw backend (thread-pool engine: fallocate visible to strace)
truncate -s 32M d.img
dev=$(NBDD_IO_ENGINE=threads nbdd attach d.img --driver ublk --name d)
dd if=/dev/urandom of=$dev bs=1M count=16 oflag=direct status=none
sync; stat -c %b d.img > $WORK/d.blocks-written
strace -f -qq -e trace=fallocate -o $WORK/d.strace -p $(daemon_pid ublk\${dev#/dev/ublkb}) & st=$!
sleep 3
blkdiscard -o 0 -l 4M $dev; echo $? > $WORK/d.discard.rc
blkdiscard -z -o 8M -l 4M $dev; echo $? > $WORK/d.zero.rc
sleep 2; kill $st; wait $st
stat -c %b d.img > $WORK/d.blocks-after
cmp -n 4194304 $dev /dev/zero && echo zero > $WORK/d.trimmed-reads
cmp -n 4194304 -i 8388608:0 $dev /dev/zero && echo zero > $WORK/d.zeroed-reads
nbdd detach d

# --- the daemon killed (SIGKILL) in the middle of a verified write job: the kernel holds the I/O
# (USER_RECOVERY_REISSUE), a new daemon recovers the device, and fio finishes without errors
FIO="fio --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite --verify=crc32c --verify_fatal=1 --output-format=json"
recover() {
  local tag=$1 img=$2 dev=$3; shift 3
  nbdd attach $img --driver ublk --device $dev --name $tag "$@" > /dev/null || return 1
  $FIO --name=$tag --filename=$dev --size=24M --rate_iops=1000 --output=$WORK/$tag.fio.json & local fio=$!
  sleep 4
  kill -0 $fio && echo running > $WORK/$tag.running-at-kill
  kill -9 $(daemon_pid ublk\${dev#/dev/ublkb})
  sleep 1
  nbdd list --json > $WORK/$tag.list-after-kill.json
  # raw: by --device; qcow2: by --name alone, as a systemd restart does (the orphan of either driver)
  if [ $tag = rk-raw ]; then again="--device $dev"; else again="--name $tag"; fi
  nbdd attach $img $again --json > $WORK/$tag.reattach.json; echo $? > $WORK/$tag.reattach.rc
  wait $fio; echo $? > $WORK/$tag.fio.rc
  nbdd detach $tag; echo $? > $WORK/$tag.detach.rc
  cp /run/nbdd/$tag.log $WORK/$tag.log
}
truncate -s 32M rk.img
# raw: queue threads before the kill, the event loop after (recovery does not depend on the mode)
recover rk-raw /tmp/rk.img /dev/ublkb3 --queue-threads
recover rk-qcow2 /tmp/rk.qcow2 /dev/ublkb4 --create 32M
qemu-img check --output=json /tmp/rk.qcow2 > $WORK/rk-qcow2.check.json; echo $? > $WORK/rk-qcow2.check.rc

# --- a partitioned image: partitions there when attach returns; detach refused while one is mounted
truncate -s 32M /tmp/up.raw
printf 'label: gpt\n,12M\n,\n' | sfdisk -q /tmp/up.raw
dev=$(nbdd attach /tmp/up.raw --driver ublk --name up)
ls /dev | grep "^\${dev#/dev/}p" > $WORK/up.parts
mkfs.ext4 -q \${dev}p1 && mkdir -p /mnt/up && mount \${dev}p1 /mnt/up
record up-detach-mounted nbdd detach up
umount /mnt/up
nbdd detach up; echo $? > $WORK/up.detach.rc

# --- error paths: clear messages, nothing left behind
truncate -s 16M busy.img other.img user.img; chmod 666 user.img
udevs > $WORK/devices-before-errors
record u-missing nbdd attach /tmp/no-such.img --driver ublk
udevs > $WORK/devices-after-missing
nbdd attach busy.img --driver ublk --device /dev/ublkb5 --name busy > $WORK/busy.dev
record u-busy nbdd attach other.img --driver ublk --device /dev/ublkb5
udevs > $WORK/devices-after-busy
nbdd detach busy
record u-notroot setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all node $REPO/bin/nbdd attach /tmp/user.img --driver ublk --foreground
udevs > $WORK/devices-after-notroot
busybox rmmod ublk_drv; echo $? > $WORK/rmmod.rc
record u-nodriver nbdd attach /tmp/user.img --driver ublk
record final-list nbdd list --json
`, { timeoutMs: 1_200_000 }); // about 6 min alone under TCG, more beside the interop tier
}, 1_800_000); // may wait for other VM runs (one at a time)

describe.each(['qcow2', 'raw'])('%s image through /dev/ublkbN', (tag) => {
  it('attaches, prints the device as JSON, lists it with driver ublk and its daemon pid', () => {
    expect(s.text(`${tag}.rc`).trim(), s.log).toBe('0');
    const a = s.json<{ device: string; index: number; name: string; pid: number; driver: string }>(`${tag}.attach.json`);
    expect(a).toMatchObject({ device: `/dev/ublkb${a.index}`, name: tag, driver: 'ublk' });
    const listed = s.json<Listed[]>(`${tag}.list.json`).find((d) => d.device === a.device);
    expect(listed).toMatchObject({ driver: 'ublk', state: 'connected', daemonPid: a.pid, sizeBytes: 64 << 20, image: `/tmp/disk.${tag}`, queues: tag === 'raw' ? 2 : 1, depth: 128 });
  });

  it('offers discard, write zeroes, a volatile cache and FUA to the kernel', () => {
    expect(Number(s.text(`${tag}.discard_max`))).toBeGreaterThan(0);
    expect(Number(s.text(`${tag}.write_zeroes_max`))).toBeGreaterThan(0);
    expect(s.text(`${tag}.write_cache`).trim()).toBe('write back');
    expect(s.text(`${tag}.fua`).trim()).toBe('1');
  });

  it('fstrim trims through the device; the control socket reports the device and its ops', () => {
    expect(s.text(`${tag}.fstrim.rc`).trim(), s.text(`${tag}.fstrim`)).toBe('0');
    expect(s.text(`${tag}.fstrim`)).toMatch(/trimmed/);
    // raw runs its queues on threads of their own (--queue-threads), qcow2 on the event loop.
    expect(s.json(`${tag}.status.json`)).toMatchObject({ device: expect.stringMatching(/^\/dev\/ublkb\d+$/), driver: 'ublk', queues: tag === 'raw' ? 2 : 1, depth: 128, queueThreads: tag === 'raw', inFlight: 0 });
    const stats = s.json<{ ops: Record<string, { count: number; errors: number; bytes: number }> }>(`${tag}.stats.json`).ops;
    expect(stats.trim!.count).toBeGreaterThan(0);
    expect(stats.flush!.count).toBeGreaterThan(0);
    expect(stats.write!.bytes).toBeGreaterThan(5 << 20);
    for (const op of ['read', 'write', 'trim', 'flush', 'writeZeroes']) expect(stats[op]!.errors, op).toBe(0);
  });

  it('the sidecar serves the dirty bitmap and block status of the ublk device (nbdinfo)', () => {
    expect(s.text(`${tag}.bitmap-add.err`)).not.toMatch(/nbdd: /);
    // nbdinfo --totals: "bytes percent type description" per flag value; mkfs and the files dirtied some.
    const dirty = s.text(`${tag}.dirty-totals`).split('\n').find((l) => /\bdirty\b/.test(l) && !/clean/.test(l));
    expect(dirty, s.text(`${tag}.dirty-totals`) + s.text(`${tag}.dirty-totals.err`)).toBeDefined();
    expect(Number(dirty!.trim().split(/\s+/)[0])).toBeGreaterThan(3 << 20);
    expect(s.text(`${tag}.alloc-totals`)).toMatch(/\bdata\b/);
    expect(s.json<{ name: string; sidecar: string | null }[]>(`${tag}.list.json`).find((d) => d.name === tag)?.sidecar).toBe(`/run/nbdd/${tag}`);
  });

  it('detaches: exit 0, state file and device gone, the daemon logged the close', () => {
    expect(s.text(`${tag}.detach.rc`).trim()).toBe('0');
    expect(s.text(`${tag}.run-after-detach`)).not.toMatch(/\.json/);
    expect(s.text(`${tag}.devices-after-detach`).trim()).toBe('0');
    expect(s.text(`${tag}.daemon.log`)).toMatch(/detached; \/tmp\/disk\.\w+ closed/);
  });

  it('a read-only re-attach reads the same checksums and refuses writes', () => {
    expect(s.text(`${tag}.getro`).trim()).toBe('1');
    expect(s.status(`${tag}-ro-dd`)).not.toBe(0);
    expect(s.text(`${tag}-ro-dd.err`)).toMatch(/Operation not permitted|Read-only file system/);
    const written = s.text(`${tag}.sums-written`);
    expect(written.split('\n').filter(Boolean)).toHaveLength(2);
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

/** fio's JSON report; fio writes warnings (e.g. "multiple writers may overwrite blocks") before it. */
function fioJson<T>(name: string): T {
  const text = s.text(name);
  return JSON.parse(text.slice(text.indexOf('{'))) as T;
}

describe('fio --verify=crc32c', () => {
  it('2 queues (2 blk-mq hardware queues), 2 jobs of 4 KiB random writes: no errors, everything verified', () => {
    expect(s.text('fio.hwqueues').trim(), s.log).toBe('2');
    expect(s.text('fio.rc').trim(), s.text('fio.json')).toBe('0');
    const job = fioJson<{ jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] }>('fio.json').jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(32 << 20);
    expect(job.read.io_bytes).toBe(32 << 20);
  });
  it('1 MiB writes (split by max_sectors into 512 KiB requests): no errors', () => {
    expect(s.text('fio-big.rc').trim(), s.text('fio-big.json')).toBe('0');
  });
});

it('blkdiscard arrives as punch hole and blkdiscard -z as zero range (or punch), both read as zeroes', () => {
  expect(s.text('d.discard.rc').trim(), s.log).toBe('0');
  expect(s.text('d.zero.rc').trim()).toBe('0');
  const calls = s.text('d.strace').split('\n').filter((l) => l.includes('fallocate('));
  expect(calls.some((l) => /PUNCH_HOLE, 0, 4194304\)/.test(l)), calls.join('\n')).toBe(true);
  expect(calls.some((l) => /fallocate\(\d+, (FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE\|FALLOC_FL_PUNCH_HOLE), 8388608, 4194304\)/.test(l)), calls.join('\n')).toBe(true);
  expect(Number(s.text('d.blocks-after'))).toBeLessThan(Number(s.text('d.blocks-written')));
  expect(s.text('d.trimmed-reads').trim()).toBe('zero');
  expect(s.text('d.zeroed-reads').trim()).toBe('zero');
});

describe.each([
  ['rk-raw', '/dev/ublkb3'],
  ['rk-qcow2', '/dev/ublkb4'],
])('%s: SIGKILL of the daemon mid-job', (tag, dev) => {
  it('lists the device as daemon-dead; `nbdd attach IMAGE --device DEV` recovers it', () => {
    expect(s.text(`${tag}.running-at-kill`).trim(), s.log).toBe('running');
    const dead = s.json<Listed[]>(`${tag}.list-after-kill.json`).find((d) => d.device === dev);
    expect(dead).toMatchObject({ driver: 'ublk', state: 'daemon-dead', daemonPid: null });
    expect(s.text(`${tag}.reattach.rc`).trim()).toBe('0');
    expect(s.json(`${tag}.reattach.json`)).toMatchObject({ device: dev, name: tag, reattached: true, driver: 'ublk' });
    expect(s.text(`${tag}.log`)).toMatch(new RegExp(`${dev}: recovered`));
  });
  it('fio --verify finishes with no errors: every write the dead daemon held was reissued', () => {
    expect(s.text(`${tag}.fio.rc`).trim(), s.text(`${tag}.fio.json`)).toBe('0');
    const job = fioJson<{ jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] }>(`${tag}.fio.json`).jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(24 << 20);
    expect(job.read.io_bytes).toBe(24 << 20);
    expect(s.text(`${tag}.detach.rc`).trim()).toBe('0');
  });
});

it('the recovered qcow2 image has no corruption (the dead daemon\'s allocation pool shows as leaks only)', () => {
  const check = s.json<{ 'check-errors': number; corruptions?: number }>('rk-qcow2.check.json');
  expect(['0', '3'], s.text('rk-qcow2.check.json')).toContain(s.text('rk-qcow2.check.rc').trim());
  expect(check['check-errors']).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
});

describe('error paths: a clear message, a non-zero exit, no device left behind', () => {
  it.each([
    ['u-missing', /\/tmp\/no-such\.img does not exist/, 'devices-after-missing'],
    ['u-busy', /\/dev\/ublkb5 is in use: served by pid \d+/, 'devices-after-busy'],
    ['u-notroot', /ublk devices need root|needs root or CAP_SYS_ADMIN/, 'devices-after-notroot'],
  ])('%s', (name, message, after) => {
    expect(s.status(name), s.log).not.toBe(0);
    expect(s.text(`${name}.err`)).toMatch(message);
    expect(s.text(`${name}.err`)).toMatch(/^nbdd: /m);
    const before = Number(s.text('devices-before-errors'));
    // u-busy runs while busy.img holds /dev/ublkb5: one device more, not two.
    expect(Number(s.text(after))).toBe(name === 'u-busy' ? before + 1 : before);
  });
  it('ublk_drv not loaded: says to modprobe it', () => {
    expect(s.text('rmmod.rc').trim(), s.log).toBe('0');
    expect(s.status('u-nodriver')).not.toBe(0);
    expect(s.text('u-nodriver.err')).toMatch(/modprobe ublk_drv/);
  });
  it('lists nothing connected at the end', () => {
    expect(s.status('final-list'), s.text('final-list.err')).toBe(0);
    expect(s.json<Listed[]>('final-list.out').filter((d) => d.state !== 'idle')).toEqual([]);
  });
});

describe('a partitioned image on ublk', () => {
  it('shows its partitions when attach returns, and detach refuses while one is mounted', () => {
    expect(s.text('up.parts').trim().split('\n')).toEqual([expect.stringMatching(/^ublkb\d+p1$/), expect.stringMatching(/^ublkb\d+p2$/)]);
    expect(s.status('up-detach-mounted')).not.toBe(0);
    expect(s.text('up-detach-mounted.err')).toMatch(/\/dev\/ublkb\d+ is in use: \/dev\/ublkb\d+p1 is mounted on \/mnt\/up/);
    expect(s.text('up.detach.rc').trim()).toBe('0');
  });
});
