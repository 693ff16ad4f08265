/**
 * `nbdd serve --tls` against real TLS clients: nbdinfo and nbdcopy (libnbd, GnuTLS) with x509
 * certificates, qemu-img and qemu-io (`--object tls-creds-psk`) with a pre-shared key. Plaintext
 * is refused under `require` and allowed under `on`; a certificate from another CA, a wrong key
 * and a missing client certificate are refused with a message that says so, and the daemon goes
 * on serving. Credentials are made with openssl at test time.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBDD, requireTool, run, runStatus, serveNbdd, tempDir, type Served } from '../helpers/tools.js';
import { makeTlsCreds } from '../helpers/tls-creds.js';

let dir: ReturnType<typeof tempDir>;
let x509: string; // ca-cert.pem, server-cert.pem, server-key.pem
let otherCa: string; // a CA that signed nothing of ours
let clientCerts: string; // ca-cert.pem, client-cert.pem, client-key.pem
let pskDir: string; // keys.psk (qemu's layout: the file name is fixed)
let wrongPskDir: string;
let image: string;

beforeAll(() => {
  for (const t of ['openssl', 'nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io']) requireTool(t);
  dir = tempDir('nbdd-tls-');
  ({ x509, client: clientCerts, otherCa, pskDir, wrongPskDir } = makeTlsCreds(dir.path));
  image = join(dir.path, 'disk.raw');
  writeFileSync(image, Buffer.alloc(4 << 20));
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 1M', image]);
});
afterAll(() => dir.remove());

/** `nbdd serve IMAGE --port P` on a free loopback port; resolves once it listens. */
async function serveTcp(args: string[]): Promise<{ port: number; stop: () => Promise<void> }> {
  const own = join(dir.path, `tcp-${Math.random().toString(36).slice(2)}.raw`); // the other servers hold the image's lock
  copyFileSync(image, own);
  const child = spawn(NBDD, ['serve', own, '--port', '0', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => {
      err += d;
      const m = /listening on 127\.0\.0\.1:(\d+)/.exec(err);
      if (m) resolve(Number(m[1]));
    });
    child.on('exit', (code) => reject(new Error(`nbdd serve exited ${code}: ${err}`)));
  });
  return {
    port,
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

const tlsUri = (s: Served, query: string): string => `nbds+unix:///?socket=${s.socket}&${query}`;

function qemuPsk(s: Served, keysDir: string, command: string): { status: number; stdout: string; stderr: string } {
  return runStatus('qemu-io', [
    '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${keysDir},username=alice`,
    '--image-opts', `driver=nbd,path=${s.socket},tls-creds=tls0`,
    '-c', command,
  ]);
}

describe('nbdd serve --tls require with x509 certificates', () => {
  let s: Served;
  beforeAll(async () => {
    s = await serveNbdd(image, ['--tls', 'require', '--tls-certificates', x509]);
  });
  afterAll(async () => s.stop());

  it('nbdinfo and nbdcopy (libnbd) connect over TLS and copy the disk byte for byte', () => {
    expect(run('nbdinfo', [tlsUri(s, `tls-certificates=${x509}`)])).toMatch(/newstyle-fixed with TLS/);
    const copy = join(dir.path, 'copy.raw');
    run('nbdcopy', [tlsUri(s, `tls-certificates=${x509}`), copy]);
    expect(readFileSync(copy).equals(readFileSync(image))).toBe(true);
  });

  it('refuses plaintext: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD', () => {
    const r = runStatus('nbdinfo', [`nbd+unix:///?socket=${s.socket}`]);
    expect(r.status).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/without TLS|Operation not supported|TLS/);
  });

  it('a client trusting another CA refuses the server (over TCP, where libnbd checks the certificate); the daemon goes on serving', async () => {
    const tcp = await serveTcp(['--tls', 'require', '--tls-certificates', x509]);
    try {
      const r = runStatus('nbdinfo', ['--size', `nbds://127.0.0.1:${tcp.port}/?tls-certificates=${otherCa}`]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/certificate verification/i);
      expect(run('nbdinfo', ['--size', `nbds://127.0.0.1:${tcp.port}/?tls-certificates=${x509}`]).trim()).toBe(String(4 << 20));
    } finally {
      await tcp.stop();
    }
  });
});

describe('--tls-verify-peer: client certificates', () => {
  it('accepts a client certificate signed by the CA, refuses a client without one, saying so', async () => {
    const s = await serveNbdd(image, ['--tls', 'require', '--tls-certificates', x509, '--tls-verify-peer']);
    try {
      expect(run('nbdinfo', ['--size', tlsUri(s, `tls-certificates=${clientCerts}`)]).trim()).toBe(String(4 << 20));
      const r = runStatus('nbdinfo', [tlsUri(s, `tls-certificates=${x509}`)]); // the server's dir: no client cert
      expect(r.status).not.toBe(0);
      for (let i = 0; i < 40 && !/sent no certificate|refused/.test(s.stderr()); i++) await new Promise((res) => setTimeout(res, 50));
      expect(s.stderr()).toMatch(/the client sent no certificate|certificate was refused/);
    } finally {
      await s.stop();
    }
  });
});

describe('nbdd serve --tls require with a pre-shared key (psktool format)', () => {
  it('qemu-io (tls-creds-psk) reads and writes over TLS; a wrong key is refused with a message naming the key', async () => {
    const s = await serveNbdd(image, ['--tls', 'require', '--tls-psk', join(pskDir, 'keys.psk')]);
    try {
      const ok = qemuPsk(s, pskDir, 'read -P 0x3c 0 1M');
      expect(ok.status, ok.stderr).toBe(0);
      expect(qemuPsk(s, pskDir, 'write -P 0x77 2M 64k').status).toBe(0);
      expect(qemuPsk(s, pskDir, 'read -P 0x77 2M 64k').status).toBe(0);
      const bad = qemuPsk(s, wrongPskDir, 'read 0 4k');
      expect(bad.status).not.toBe(0);
      expect(bad.stderr).toMatch(/TLS handshake failed/);
      for (let i = 0; i < 40 && !/pre-shared key does not match/.test(s.stderr()); i++) await new Promise((res) => setTimeout(res, 50));
      expect(s.stderr()).toMatch(/the client's pre-shared key does not match/);
      expect(qemuPsk(s, pskDir, 'read -P 0x3c 0 4k').status).toBe(0); // still serving
    } finally {
      await s.stop();
    }
  });
});

describe('--tls on and bad configurations', () => {
  it('--tls on serves plaintext and TLS clients alike', async () => {
    const s = await serveNbdd(image, ['--tls', 'on', '--tls-certificates', x509]);
    try {
      expect(run('nbdinfo', [`nbd+unix:///?socket=${s.socket}`])).toMatch(/without TLS/);
      expect(run('nbdinfo', [tlsUri(s, `tls-certificates=${x509}`)])).toMatch(/with TLS/);
    } finally {
      await s.stop();
    }
  });

  it('refuses to start without credentials, with both kinds, or with unreadable ones, naming the option', () => {
    const cases: [string[], RegExp][] = [
      [['--tls', 'require'], /needs exactly one of --tls-certificates DIR and --tls-psk FILE/],
      [['--tls', 'on', '--tls-certificates', x509, '--tls-psk', join(pskDir, 'keys.psk')], /exactly one of/],
      [['--tls', 'require', '--tls-certificates', otherCa], /--tls-certificates .*cannot read server-key\.pem/],
      [['--tls', 'require', '--tls-psk', join(dir.path, 'nope.psk')], /--tls-psk .*nope\.psk/],
      [['--tls', 'require', '--tls-psk', image], /line 1 is not username:hexkey/],
    ];
    for (const [args, pattern] of cases) {
      const r = runStatus(NBDD, ['serve', image, '--socket', join(dir.path, 'never.sock'), ...args]);
      expect(r.status, args.join(' ')).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(pattern);
      expect(r.stderr).not.toMatch(/\n\s+at /); // one line, no stack trace
    }
  });
});
