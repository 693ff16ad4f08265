/**
 * The kernel test tier's VM: Debian's 6.12 kernel (it has nbd and ublk as modules; the host
 * kernel has neither) booted under qemu TCG with the host's `/` shared read-only over 9p and a
 * tmpfs overlay on top, so every host tool runs inside at its usual path. See
 * docs/kernel.md ("Testing") and the vm-recipe this follows.
 *
 * What it fetches, it fetches with apt (`apt-get download` of the newest
 * linux-image-6.12.*-amd64-unsigned, found with `apt-cache search`) and caches, keyed by the
 * package name, under $NBDD_VM_CACHE (default /var/cache/nbdd-vm): the kernel, the decompressed
 * modules and the initramfs. A rerun with a warm cache starts booting at once.
 *
 * One `runInVm(script)` = one boot running one bash scenario script as root; its exit status,
 * its output and every file it leaves in $WORK come back through a read-write 9p share.
 */
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

export const CACHE_ROOT = process.env.NBDD_VM_CACHE ?? '/var/cache/nbdd-vm';
/** The checkout, visible at the same path inside the VM. */
export const REPO = new URL('../..', import.meta.url).pathname.replace(/\/$/, '');
/** Mount point of the read-write share inside the VM. */
export const VM_WORK = '/vmwork';

const INSTALL_HINT = 'install the VM tools with: bash scripts/install-test-deps.sh (qemu-system-x86 busybox-static xz-utils cpio)';

/** Modules loaded at boot, in dependency order (the recipe's list plus nbd and ublk_drv). */
const MODULES = ['crc32c_generic', 'crc16', 'mbcache', 'jbd2', 'ext4', 'netfs', '9pnet', '9pnet_virtio', '9p', 'overlay', 'nbd', 'ublk_drv'];
const MODULE_ARGS: Record<string, string> = { nbd: 'nbds_max=4' };

export interface VmKernel {
  /** Debian package the kernel came from. */
  pkg: string;
  vmlinuz: string;
  initramfs: string;
}

function need(tool: string): void {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${tool} is missing; ${INSTALL_HINT}`);
  }
}

/** The newest linux-image-6.12.*-amd64-unsigned package apt knows (not -cloud, not -rt). */
export function kernelPackage(): string {
  const out = execFileSync('apt-cache', ['search', '--names-only', '^linux-image-6\\.12\\.[0-9].*-amd64-unsigned$'], { encoding: 'utf8' });
  const names = out
    .split('\n')
    .map((l) => l.split(' ')[0]!)
    .filter((n) => /^linux-image-6\.12\.\d+\+deb\d+-amd64-unsigned$/.test(n));
  if (names.length === 0) throw new Error('apt-cache knows no linux-image-6.12.*-amd64-unsigned package; run apt-get update (bookworm-backports or trixie sources)');
  names.sort((a, b) => Number(/6\.12\.(\d+)/.exec(b)![1]) - Number(/6\.12\.(\d+)/.exec(a)![1]));
  return names[0]!;
}

/** The /init of the initramfs: modules, 9p root, overlay, chroot into the scenario. */
function initScript(modules: string[]): string {
  const insmods = modules.map((m) => `insmod /lib/modules/${m}.ko ${MODULE_ARGS[m] ?? ''} || fail "insmod ${m}"`).join('\n');
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "nbdd-vm: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
${insmods}
mkdir -p /mnt/host /mnt/upper /mnt/root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose hostroot /mnt/host || fail "9p hostroot"
mount -t tmpfs -o size=1536m tmpfs /mnt/upper
mkdir -p /mnt/upper/u /mnt/upper/w
mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/upper/u,workdir=/mnt/upper/w /mnt/root || fail overlay
R=/mnt/root
mkdir -p $R${VM_WORK}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=none work $R${VM_WORK} || fail "9p work"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/run && mkdir -p $R/run/lock
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
echo "nbdd-vm: running scenario"
# The checkout to test comes with each run (the initramfs is cached and shared by checkouts).
REPO=$(cat $R${VM_WORK}/repo)
# /tmp and /run are fresh tmpfs in the VM; a checkout under them (a CI clone in /tmp) comes from
# the read-only host share instead.
case "$REPO" in /tmp/*|/run/*) mkdir -p $R$REPO && mount -o bind /mnt/host$REPO $R$REPO || fail "bind $REPO";; esac
chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root WORK=${VM_WORK} REPO=$REPO \\
  /bin/bash ${VM_WORK}/scenario.sh > $R${VM_WORK}/output 2>&1
echo $? > $R${VM_WORK}/exit-code
sync
umount $R${VM_WORK}
poweroff -f
`;
}

/**
 * Builds `target` (a file or directory) once: `build(tmp)` fills a temporary path beside it, which
 * is then renamed into place, so an existing target is always complete. Concurrent callers (two
 * vitest workers) wait on a lock directory.
 */
function buildOnce(target: string, build: (tmp: string) => void): void {
  if (existsSync(target)) return;
  mkdirSync(dirname(target), { recursive: true });
  const lock = `${target}.lock`;
  const deadline = Date.now() + 600_000;
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      if (existsSync(target)) return;
      // A lock older than 10 minutes belongs to a build that died.
      if (Date.now() - statSync(lock).mtimeMs > 600_000) rmSync(lock, { recursive: true, force: true });
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${lock}`);
      execFileSync('sleep', ['1']);
    }
  }
  const tmp = `${target}.build-${process.pid}`;
  try {
    if (existsSync(target)) return;
    rmSync(tmp, { recursive: true, force: true });
    build(tmp);
    renameSync(tmp, target);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
    rmSync(lock, { recursive: true, force: true });
  }
}

/**
 * Downloads (apt-get download) and unpacks the kernel once per package:
 * `<cache>/<package>/kernel/` holds vmlinuz and the decompressed modules. The initramfs is built
 * next to that directory, once per version of the init script (its name carries a hash of it),
 * so a changed harness never boots a stale initramfs; the checkout to test is not part of it
 * (each run passes its own in $WORK/repo). Throws with the install command when a tool is missing.
 */
export function ensureKernel(): VmKernel {
  for (const t of ['qemu-system-x86_64', 'apt-get', 'dpkg-deb', 'xz', 'cpio', 'gzip']) need(t);
  if (!existsSync('/bin/busybox') || !execFileSync('file', ['-L', '/bin/busybox'], { encoding: 'utf8' }).includes('statically')) {
    throw new Error(`/bin/busybox must be the static build; ${INSTALL_HINT}`);
  }
  const pkg = kernelPackage();
  // Keyed by the module list too, so adding a module never finds a cache without it.
  const dir = join(CACHE_ROOT, pkg, `kernel-${createHash('sha256').update(MODULES.join(' ')).digest('hex').slice(0, 8)}`);
  buildOnce(dir, (tmp) => {
    const unpack = join(tmp, 'pkg');
    mkdirSync(join(tmp, 'modules'), { recursive: true });
    mkdirSync(unpack);
    execFileSync('apt-get', ['download', pkg], { cwd: tmp, stdio: 'pipe' });
    const deb = readdirSync(tmp).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} produced no .deb`);
    execFileSync('dpkg-deb', ['-x', join(tmp, deb), unpack]);
    const vmlinuz = readdirSync(join(unpack, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new Error(`${pkg} has no /boot/vmlinuz-*`);
    renameSync(join(unpack, 'boot', vmlinuz), join(tmp, 'vmlinuz'));
    for (const m of MODULES) {
      const found = execFileSync('find', [join(unpack, 'lib/modules'), '-name', `${m}.ko.xz`], { encoding: 'utf8' }).trim().split('\n')[0];
      if (!found) throw new Error(`${pkg} has no module ${m}`);
      writeFileSync(join(tmp, 'modules', `${m}.ko`), execFileSync('xz', ['-dc', found], { maxBuffer: 64 << 20 }));
    }
    rmSync(unpack, { recursive: true, force: true });
    rmSync(join(tmp, deb));
  });

  const init = initScript(MODULES);
  const initramfs = join(CACHE_ROOT, pkg, `initramfs-${createHash('sha256').update(init).digest('hex').slice(0, 12)}.cpio.gz`);
  buildOnce(initramfs, (tmp) => {
    const root = `${tmp}.root`;
    try {
      for (const d of ['bin', 'proc', 'sys', 'dev', 'mnt', 'lib/modules']) mkdirSync(join(root, d), { recursive: true });
      execFileSync('cp', ['/bin/busybox', join(root, 'bin/busybox')]);
      for (const m of MODULES) execFileSync('cp', [join(dir, 'modules', `${m}.ko`), join(root, 'lib/modules')]);
      writeFileSync(join(root, 'init'), init);
      chmodSync(join(root, 'init'), 0o755);
      execFileSync('sh', ['-c', `cd '${root}' && find . | cpio -o -H newc --quiet | gzip -1 > '${tmp}'`]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
  return { pkg, vmlinuz: join(dir, 'vmlinuz'), initramfs };
}

export interface VmOptions {
  /** Kill the VM after this long (default 240 s). */
  timeoutMs?: number;
  memoryMb?: number;
  cpus?: number;
  /** Files to put into $WORK before boot (name → contents). */
  files?: Record<string, string | Buffer>;
}

export interface VmResult {
  /** The scenario's exit status; -1 when it never finished (see `console`). */
  exitCode: number;
  /** The scenario's stdout and stderr, interleaved. */
  output: string;
  /** The serial console (kernel messages, init's own messages). */
  console: string;
  /** Every regular file the scenario left in $WORK, by name (scenario.sh, output, exit-code excluded). */
  files: Map<string, Buffer>;
  /** Wall time of the whole run. */
  ms: number;
}

/**
 * Boots the VM once and runs `script` (bash, as root) in it, with $WORK = the shared directory
 * and $REPO = this checkout. Resolves when the VM powers off or the timeout kills it.
 */
export async function runInVm(script: string, opts: VmOptions = {}): Promise<VmResult> {
  const first = await bootOnce(script, opts);
  // Emulation now and then oopses while the kernel boots (an int3 left by text patching, before
  // init runs): that run says nothing about nbdd, so it is booted once more.
  if (first.exitCode === -1 && first.output === '' && /Kernel panic/.test(first.console) && first.ms < 60_000) {
    process.stderr.write(`nbdd-vm: the kernel panicked while booting; booting again\n`);
    return bootOnce(script, opts);
  }
  return first;
}

async function bootOnce(script: string, opts: VmOptions): Promise<VmResult> {
  const kernel = ensureKernel();
  const release = await acquireVmSlot();
  const work = mkdtempSync(join(tmpdir(), 'nbdd-vm-'));
  try {
    writeFileSync(join(work, 'scenario.sh'), script);
    writeFileSync(join(work, 'repo'), REPO);
    for (const [name, data] of Object.entries(opts.files ?? {})) writeFileSync(join(work, name), data);
    const args = [
      '-accel', 'tcg,thread=multi', '-cpu', 'max',
      '-m', String(opts.memoryMb ?? 3072), '-smp', String(opts.cpus ?? 2),
      '-kernel', kernel.vmlinuz, '-initrd', kernel.initramfs,
      '-append', 'console=ttyS0 quiet panic=-1 rdinit=/init',
      '-nographic', '-no-reboot', '-nodefaults', '-serial', 'stdio',
      '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
      '-virtfs', `local,path=${work},mount_tag=work,security_model=none`,
    ];
    const started = Date.now();
    const consoleText = await new Promise<string>((resolve, reject) => {
      const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
      let text = '';
      qemu.stdout.on('data', (d: Buffer) => (text += d.toString('utf8')));
      qemu.stderr.on('data', (d: Buffer) => (text += d.toString('utf8')));
      const timer = setTimeout(() => {
        text += `\nnbdd-vm: killed after ${opts.timeoutMs ?? 240_000} ms\n`;
        qemu.kill('SIGKILL');
      }, opts.timeoutMs ?? 240_000);
      qemu.on('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      qemu.on('close', () => {
        clearTimeout(timer);
        resolve(text);
      });
    });
    const read = (name: string): string => (existsSync(join(work, name)) ? readFileSync(join(work, name), 'utf8') : '');
    const code = read('exit-code').trim();
    const files = new Map<string, Buffer>();
    for (const f of readdirSync(work)) {
      if (['scenario.sh', 'repo', 'output', 'exit-code'].includes(f) || !statSync(join(work, f)).isFile()) continue;
      files.set(f, readFileSync(join(work, f)));
    }
    return { exitCode: code === '' ? -1 : Number(code), output: read('output'), console: consoleText, files, ms: Date.now() - started };
  } finally {
    release();
    if (!process.env.NBDD_VM_KEEP) rmSync(work, { recursive: true, force: true });
  }
}

/**
 * One VM at a time on this machine (the emulator wants both cores; two at once only make both
 * slow enough to hit their time limits). A lock directory holds the owner's pid; a lock whose
 * owner is gone is taken over. Resolves with the release function.
 */
async function acquireVmSlot(): Promise<() => void> {
  const lock = join(tmpdir(), 'nbdd-vm.lock');
  const owner = join(lock, 'pid');
  for (;;) {
    try {
      mkdirSync(lock);
      writeFileSync(owner, String(process.pid));
      return () => rmSync(lock, { recursive: true, force: true });
    } catch {
      const pid = Number(existsSync(owner) ? readFileSync(owner, 'utf8') : NaN);
      let alive = false;
      try {
        alive = pid > 0 && process.kill(pid, 0);
      } catch {
        alive = false;
      }
      const since = statSync(lock, { throwIfNoEntry: false });
      if (!since) continue; // released meanwhile
      // No pid yet means the owner is between mkdir and write: wait, unless that lasts.
      if (!alive && (pid > 0 || Date.now() - since.mtimeMs > 10_000)) {
        rmSync(lock, { recursive: true, force: true });
        continue;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Renders a result for an assertion message. */
export function describeRun(r: VmResult): string {
  return `exit ${r.exitCode} after ${r.ms} ms\n--- output ---\n${r.output}\n--- console (tail) ---\n${r.console.slice(-3000)}`;
}
