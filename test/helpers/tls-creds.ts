/**
 * TLS credentials for the TLS tests, made with openssl at test time in qemu's and nbdkit's layout:
 * an x509 directory (ca-cert.pem, server-cert.pem, server-key.pem; a client directory with
 * ca-cert.pem, client-cert.pem, client-key.pem), another CA that signed nothing, and psktool files.
 */
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './tools.js';

export interface TlsCreds {
  /** Server credentials (and the CA). */
  x509: string;
  /** Client credentials signed by the same CA. */
  client: string;
  /** A CA that signed nothing of these. */
  otherCa: string;
  /** A directory holding keys.psk (qemu's layout), and the file itself. */
  pskDir: string;
  pskFile: string;
  /** The same user with another key. */
  wrongPskDir: string;
  wrongPskFile: string;
}

function makeCa(d: string, cn: string): void {
  mkdirSync(d, { recursive: true });
  run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(d, 'ca-key.pem'), '-out', join(d, 'ca-cert.pem'), '-days', '2', '-subj', `/CN=${cn}`]);
}

function signed(ca: string, out: string, name: 'server' | 'client'): void {
  const csr = join(out, `${name}.csr`);
  const ext = join(out, `${name}.ext`);
  run('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(out, `${name}-key.pem`), '-out', csr, '-subj', `/CN=${name === 'server' ? 'localhost' : 'nbdd-test-client'}`]);
  writeFileSync(ext, name === 'server' ? 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' : 'extendedKeyUsage=clientAuth\n');
  run('openssl', ['x509', '-req', '-in', csr, '-CA', join(ca, 'ca-cert.pem'), '-CAkey', join(ca, 'ca-key.pem'), '-CAcreateserial', '-out', join(out, `${name}-cert.pem`), '-days', '2', '-extfile', ext]);
}

export function makeTlsCreds(root: string): TlsCreds {
  const x509 = join(root, 'x509');
  makeCa(x509, 'nbdd test CA');
  signed(x509, x509, 'server');
  const client = join(root, 'client');
  mkdirSync(client);
  copyFileSync(join(x509, 'ca-cert.pem'), join(client, 'ca-cert.pem'));
  signed(x509, client, 'client');
  const otherCa = join(root, 'other');
  makeCa(otherCa, 'some other CA');
  const pskDir = join(root, 'psk');
  const wrongPskDir = join(root, 'psk-wrong');
  mkdirSync(pskDir);
  mkdirSync(wrongPskDir);
  writeFileSync(join(pskDir, 'keys.psk'), `alice:${'5a'.repeat(32)}\n`);
  writeFileSync(join(wrongPskDir, 'keys.psk'), `alice:${'a5'.repeat(32)}\n`);
  return { x509, client, otherCa, pskDir, pskFile: join(pskDir, 'keys.psk'), wrongPskDir, wrongPskFile: join(wrongPskDir, 'keys.psk') };
}
