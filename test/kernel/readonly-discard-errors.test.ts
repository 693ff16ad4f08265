/**
 * In the VM: read-only attach (writes refused, image unchanged), blkdiscard and blkdiscard -z
 * arriving at the raw backend as TRIM and WRITE_ZEROES (seen as its fallocate calls), and the
 * error paths a user meets: not root, device busy, image missing, image locked.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { Scenario } from './scenario.js';

let s: Scenario;

beforeAll(async () => {
  s = await Scenario.run(`
# --- read-only
mkdir -p rosrc /mnt/ro && echo "kept" > rosrc/file
truncate -s 32M ro.img && mkfs.ext4 -q -d rosrc ro.img
sha256sum < ro.img > $WORK/ro.sha-before
dev=$(nbdd attach ro.img --driver nbd --name ro --read-only --json | sed 's/.*"device":"\\([^"]*\\)".*/\\1/')
blockdev --getro $dev > $WORK/ro.getro
nbdd list --json > $WORK/ro.list.json
record ro-dd dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct
mount -o ro $dev /mnt/ro && cat /mnt/ro/file > $WORK/ro.file && umount /mnt/ro
# -w: no silent fallback to a read-only mount
record ro-mount-rw mount -w $dev /mnt/ro
umount /mnt/ro 2>/dev/null
nbdd detach ro
sha256sum < ro.img > $WORK/ro.sha-after

# --- discard and write-zeroes reach the backend
truncate -s 32M d.img
# The thread-pool engine makes fallocate a system call strace can see (io_uring would hide it).
dev=$(NBDD_IO_ENGINE=threads nbdd attach d.img --driver nbd --name d)
cat /sys/block/\${dev#/dev/}/queue/discard_max_bytes > $WORK/d.discard_max
cat /sys/block/\${dev#/dev/}/queue/write_zeroes_max_bytes > $WORK/d.write_zeroes_max
dd if=/dev/urandom of=$dev bs=1M count=16 oflag=direct status=none
sync; stat -c %b d.img > $WORK/d.blocks-written
strace -f -qq -e trace=fallocate -o $WORK/d.strace -p $(daemon_pid \${dev#/dev/}) & st=$!
sleep 3
blkdiscard -o 0 -l 4M $dev; echo $? > $WORK/d.discard.rc
blkdiscard -z -o 8M -l 4M $dev; echo $? > $WORK/d.zero.rc
sleep 2; kill $st; wait $st
stat -c %b d.img > $WORK/d.blocks-after
cmp -n 4194304 $dev /dev/zero && echo zero > $WORK/d.trimmed-reads
cmp -n 4194304 -i 8388608:0 $dev /dev/zero && echo zero > $WORK/d.zeroed-reads
nbdd detach d

# --- error paths
truncate -s 16M busy.img other.img locked.img user.img
chmod 666 user.img
dev=$(nbdd attach busy.img --name busy --device /dev/nbd2)
record busy nbdd attach other.img --device /dev/nbd2 --foreground
# udev rules: the link for a connected nbdd device, nothing but "not ready" for an idle one
nbdd install-udev --no-reload > $WORK/udev.installed
udevadm test --action=change /sys/block/nbd2 > $WORK/udev-connected.txt 2>&1
udevadm test --action=change /sys/block/nbd3 > $WORK/udev-idle.txt 2>&1
nbdd detach busy
record missing nbdd attach /tmp/no-such.img --driver nbd
flock -x locked.img sleep 300 & holder=$!
sleep 1
record locked nbdd attach locked.img --driver nbd
kill $holder
record notroot setpriv --reuid=65534 --regid=65534 --clear-groups node $REPO/bin/nbdd attach /tmp/user.img --driver nbd --foreground
record final-list nbdd list --json
`);
}, 1_800_000); // may wait for other VM runs (one at a time)

describe('read-only attach', () => {
  it('marks the device read-only and lists it so', () => {
    expect(s.text('ro.getro').trim(), s.log).toBe('1');
    expect(s.json<{ name: string; readOnly: boolean }[]>('ro.list.json').find((d) => d.name === 'ro')).toMatchObject({ readOnly: true });
  });
  it('refuses writes with EPERM/EROFS, mounts read-only and reads the file, leaves the image unchanged', () => {
    expect(s.status('ro-dd')).not.toBe(0);
    expect(s.text('ro-dd.err')).toMatch(/Operation not permitted|Read-only file system/);
    expect(s.status('ro-mount-rw')).not.toBe(0);
    expect(s.text('ro.file')).toBe('kept\n');
    expect(s.text('ro.sha-after')).toBe(s.text('ro.sha-before'));
  });
});

describe('discard and write zeroes', () => {
  it('the device offers both to the kernel', () => {
    expect(Number(s.text('d.discard_max')), s.log).toBeGreaterThan(0);
    expect(Number(s.text('d.write_zeroes_max'))).toBeGreaterThan(0);
  });
  it('blkdiscard arrives as TRIM (punch hole) and blkdiscard -z as WRITE_ZEROES (zero range / punch), and both read as zeroes', () => {
    expect(s.text('d.discard.rc').trim()).toBe('0');
    expect(s.text('d.zero.rc').trim()).toBe('0');
    const calls = s.text('d.strace').split('\n').filter((l) => l.includes('fallocate('));
    // TRIM of [0, 4 MiB): FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE over the range.
    expect(calls.some((l) => /PUNCH_HOLE, 0, 4194304\)/.test(l)), calls.join('\n')).toBe(true);
    // WRITE_ZEROES of [8, 12 MiB): the kernel sets NO_HOLE for BLKZEROOUT, so ZERO_RANGE is tried
    // first (tmpfs refuses it and the backend then writes zeroes); either way it starts here.
    expect(calls.some((l) => /fallocate\(\d+, (FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE\|FALLOC_FL_PUNCH_HOLE), 8388608, 4194304\)/.test(l)), calls.join('\n')).toBe(true);
    expect(Number(s.text('d.blocks-after'))).toBeLessThan(Number(s.text('d.blocks-written')));
    expect(s.text('d.trimmed-reads').trim()).toBe('zero');
    expect(s.text('d.zeroed-reads').trim()).toBe('zero');
  });
});

describe('udev rules (nbdd install-udev, udevadm test)', () => {
  it('installs the rules file', () => {
    expect(s.text('udev.installed').trim(), s.log).toBe('/etc/udev/rules.d/60-nbdd.rules');
  });
  it('links a connected nbdd device as /dev/disk/by-nbdd/NAME', () => {
    expect(s.text('udev-connected.txt')).toMatch(/^DEVLINKS=.*\/dev\/disk\/by-nbdd\/busy\b/m);
  });
  it('marks an unconnected nbd device not ready and gives it no link', () => {
    const out = s.text('udev-idle.txt');
    expect(out).toMatch(/^SYSTEMD_READY=0$/m);
    expect(out).toMatch(/^UDISKS_IGNORE=1$/m);
    expect(out).not.toContain('by-nbdd');
  });
});

describe('error paths: a clear message and a non-zero exit', () => {
  it.each([
    ['busy', /\/dev\/nbd2 is in use/],
    ['missing', /\/tmp\/no-such\.img does not exist/],
    ['locked', /locked\.img is in use: another process has it open/],
    ['notroot', /attaching needs root or CAP_SYS_ADMIN/],
  ])('%s', (name, message) => {
    expect(s.status(name), s.log).not.toBe(0);
    expect(s.text(`${name}.err`)).toMatch(message);
    expect(s.text(`${name}.err`)).toMatch(/^nbdd: /m);
  });
  it('leaves no device connected behind', () => {
    expect(s.status('final-list'), s.text('final-list.err')).toBe(0);
    expect(s.json<{ state: string }[]>('final-list.out').filter((d) => d.state !== 'idle')).toEqual([]);
  });
});
