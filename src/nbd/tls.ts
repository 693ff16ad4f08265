/**
 * TLS for NBD (NBD_OPT_STARTTLS), with Node's `tls` module, laid out as qemu and nbdkit lay it out:
 *
 *   x509: a directory with ca-cert.pem, server-cert.pem and server-key.pem (server side), or
 *         ca-cert.pem (+ client-cert.pem and client-key.pem when the server verifies peers);
 *   PSK:  a file of `username:hexkey` lines, as `psktool` writes them.
 *
 * `mode`: `off` (STARTTLS refused), `on` (offered; plaintext allowed), `require` (every option but
 * STARTTLS and ABORT answered NBD_REP_ERR_TLS_REQD until TLS is up). PSK runs on TLS 1.2 (Node's
 * PSK support); x509 on TLS 1.2 or 1.3.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import type * as tls from 'node:tls';
import { Errno, NbddError, messageOf } from '../core/errors.js';
import type { ClientTlsSpec } from './uri.js';
import { lazyBuiltin } from '../core/lazy-builtin.js';
import { logger } from '../core/log.js';
import type { TurnWriter } from './turn-writer.js';
import type { ChunkReader } from './wire/reader.js';

const log = logger('nbd');

/** Node's `tls`, loaded on first use: a daemon that never speaks TLS does not carry it. */
export const nodeTls = lazyBuiltin<typeof tls>('node:tls');

export type TlsMode = 'off' | 'on' | 'require';

export interface TlsOptions {
  mode: TlsMode;
  /** Directory with the x509 files. */
  certificates?: string;
  /** File of `username:hexkey` lines. */
  psk?: string;
  /** Ask for and check a client certificate (x509 only). */
  verifyPeer?: boolean;
}

/** What a server needs to take a connection to TLS. */
export interface ServerTls {
  readonly mode: 'on' | 'require';
  readonly kind: 'x509' | 'psk';
  /** Starts the server side of TLS on `socket` (after the STARTTLS reply went out). */
  wrap(socket: Socket): tls.TLSSocket;
}

/**
 * Takes a server connection to TLS after the STARTTLS reply: the reply leaves in plaintext, the
 * socket is handed to TLS (bytes the client sent early, still in `reader`, go with it), and the
 * TLS socket's events go where the plain one's went. All of it in the caller's turn, so no
 * plaintext 'data' event falls in between. Returns the TLS socket.
 */
export function upgradeToTls(
  plain: Socket,
  t: ServerTls,
  reader: ChunkReader,
  out: TurnWriter,
  on: { onData: (b: Buffer) => void; onDrain: () => void; onGone: () => void; onSecure: () => void; label: string },
): tls.TLSSocket {
  plain.off('data', on.onData);
  out.flushNow();
  if (reader.length > 0) plain.unshift(reader.consume(reader.length));
  const secure = t.wrap(plain);
  out.retarget(secure);
  secure.on('data', on.onData);
  secure.on('drain', on.onDrain);
  secure.on('close', on.onGone);
  secure.on('error', (err) => {
    log.warn(`${on.label}: ${describeTlsFailure(t, err)}; closing`);
    on.onGone();
  });
  secure.once('secure', () => {
    log.debug(`${on.label}: TLS up (${secure.getProtocol()}, ${secure.getCipher()?.name})`);
    on.onSecure();
  });
  return secure;
}

/** A failed handshake in words a user can act on (OpenSSL's own text follows in brackets). */
export function describeTlsFailure(t: Pick<ServerTls, 'kind'>, err: Error): string {
  const m = err.message;
  let why = 'the TLS handshake failed';
  if (t.kind === 'psk' && /bad record mac|decryption failed|psk/i.test(m)) why = "the client's pre-shared key does not match the key of its username in --tls-psk (or the username is unknown)";
  else if (/peer did not return a certificate|certificate required/i.test(m)) why = 'the client sent no certificate (--tls-verify-peer needs one)';
  else if (/certificate verify failed|unknown ca|bad certificate/i.test(m)) why = 'the certificate was refused: it is not signed by the CA in ca-cert.pem';
  else if (/wrong version number|http request|unknown protocol/i.test(m)) why = 'the client did not speak TLS after STARTTLS';
  else if (/no shared cipher|no suitable/i.test(m)) why = `no cipher both ends accept (this server uses ${t.kind === 'psk' ? 'PSK' : 'x509 certificates'})`;
  return `${why} [${m.replace(/^[0-9A-F]+:error:[0-9A-F]+:/, '').replace(/:\.\.\/deps\/openssl.*$/, '')}]`;
}

function readCredential(dir: string, file: string): Buffer {
  try {
    return readFileSync(join(dir, file));
  } catch (err) {
    throw new NbddError(Errno.EINVAL, `--tls-certificates ${dir}: cannot read ${file}: ${messageOf(err).replace(/^E[A-Z]+: /, '')}`);
  }
}

/** Reads a psktool file: `username:hexkey` per line. */
export function readPskFile(path: string): Map<string, Buffer> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new NbddError(Errno.EINVAL, `--tls-psk ${path}: ${messageOf(err).replace(/^E[A-Z]+: /, '')}`);
  }
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((line, i) => {
    const l = line.trim();
    if (!l || l.startsWith('#')) return;
    const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(l);
    if (!m || m[2]!.length % 2 !== 0) throw new NbddError(Errno.EINVAL, `--tls-psk ${path}: line ${i + 1} is not username:hexkey`);
    keys.set(m[1]!, Buffer.from(m[2]!, 'hex'));
  });
  if (keys.size === 0) throw new NbddError(Errno.EINVAL, `--tls-psk ${path}: no username:hexkey line`);
  return keys;
}

/** The server's TLS from the command line's options; null for `off`. Throws NbddError for bad credentials. */
export function serverTls(o: TlsOptions): ServerTls | null {
  if (o.mode === 'off') return null;
  if (!o.certificates === !o.psk) throw new NbddError(Errno.EINVAL, `--tls ${o.mode} needs exactly one of --tls-certificates DIR and --tls-psk FILE`);
  let options: tls.TLSSocketOptions;
  if (o.certificates) {
    const dir = o.certificates;
    const secureContext = nodeTls().createSecureContext({
      key: readCredential(dir, 'server-key.pem'),
      cert: readCredential(dir, 'server-cert.pem'),
      ...(o.verifyPeer ? { ca: readCredential(dir, 'ca-cert.pem') } : {}),
    });
    options = { isServer: true, secureContext, requestCert: !!o.verifyPeer, rejectUnauthorized: !!o.verifyPeer };
  } else {
    if (o.verifyPeer) throw new NbddError(Errno.EINVAL, '--tls-verify-peer needs x509 certificates, not a PSK');
    const keys = readPskFile(o.psk!);
    options = {
      isServer: true,
      ciphers: 'PSK',
      maxVersion: 'TLSv1.2',
      pskCallback: (_socket: tls.TLSSocket, identity: string) => keys.get(identity) ?? null,
    } as tls.TLSSocketOptions;
  }
  return { mode: o.mode, kind: o.certificates ? 'x509' : 'psk', wrap: (socket) => new (nodeTls().TLSSocket)(socket, options) };
}

/**
 * The client side of TLS for an nbds:// URI: x509 with the CA in `certificates`/ca-cert.pem (the
 * system's CAs without one) and a client certificate when the directory has one, or a PSK from
 * the psktool file for `username` (the file's only or first user when none is named). `host`: the
 * server's name for the certificate check (none for Unix sockets: the chain is still checked).
 */
export function clientTlsOptions(spec: ClientTlsSpec, host: string | null): tls.ConnectionOptions {
  if (spec.pskFile) {
    const keys = readPskFile(spec.pskFile);
    const identity = spec.username ?? [...keys.keys()][0]!;
    const psk = keys.get(identity);
    if (!psk) throw new NbddError(Errno.EINVAL, `tls-psk-file ${spec.pskFile} has no key for user '${identity}'`);
    return { ciphers: 'PSK', maxVersion: 'TLSv1.2', pskCallback: () => ({ psk, identity }), checkServerIdentity: () => undefined };
  }
  const options: tls.ConnectionOptions = { rejectUnauthorized: spec.verifyPeer };
  const dir = spec.certificates;
  if (dir) {
    const read = (f: string): Buffer | undefined => {
      try {
        return readFileSync(join(dir, f));
      } catch {
        return undefined;
      }
    };
    const ca = read('ca-cert.pem');
    if (ca) options.ca = ca;
    const cert = read('client-cert.pem');
    const key = read('client-key.pem');
    if (cert && key) Object.assign(options, { cert, key });
    if (!ca && !cert) throw new NbddError(Errno.EINVAL, `tls-certificates ${dir} holds neither ca-cert.pem nor client-cert.pem`);
  }
  if (host) {
    options.host = host; // what the certificate must name (an IP address too)
    if (!/^[0-9.]+$|:/.test(host)) options.servername = host; // SNI takes names only
  } else {
    options.checkServerIdentity = () => undefined; // a Unix socket has no name to check; the chain is
  }
  return options;
}
