/**
 * NBD URIs, as libnbd's `nbd_connect_uri` and the NBD URI spec (NetworkBlockDevice/nbd
 * doc/uri.md) define them:
 *
 *   nbd://HOST[:PORT]/[EXPORT]            TCP, port 10809 by default, HOST may be [IPv6]
 *   nbd+unix:///[EXPORT]?socket=PATH      Unix domain socket (the authority must be empty)
 *   nbds://…, nbds+unix://…               TLS (NBD_OPT_STARTTLS), with libnbd's query parameters
 *                                         tls-certificates=DIR, tls-psk-file=FILE, tls-username=NAME
 *                                         (or nbds://NAME@HOST/…), tls-verify-peer=false
 *   nbd+vsock://CID[:PORT]/[EXPORT]       AF_VSOCK: refused here
 *
 * The export name is the path without its first '/', percent-decoded (`nbd://h//x` names "/x").
 * Other query parameters are ignored, as libnbd ignores unknown ones.
 * Pure: no I/O.
 */
import { Errno, NbddError } from '../core/errors.js';
import { LIMITS, NBD_DEFAULT_PORT } from './wire/constants.js';

export type NbdTransport = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** TLS as an nbds:// URI asks for it (src/nbd/tls.ts turns it into credentials). */
export interface ClientTlsSpec {
  /** x509: directory with ca-cert.pem (and client-cert.pem, client-key.pem); default: the system CAs. */
  certificates?: string;
  /** PSK: a psktool file of username:hexkey lines. */
  pskFile?: string;
  username?: string;
  /** Check the server's certificate (default true). */
  verifyPeer: boolean;
}

export interface NbdUri {
  transport: NbdTransport;
  exportName: string;
  /** Present for nbds:// and nbds+unix://. */
  tls?: ClientTlsSpec;
}

const SCHEME = /^(nbds?)(?:\+(unix|tcp|vsock))?:\/\//i;

/** True when `s` starts with an NBD URI scheme (nbd, nbds, nbd+unix, …), valid or not. */
export function isNbdUri(s: string): boolean {
  return SCHEME.test(s);
}

function invalid(uri: string, why: string): NbddError {
  return new NbddError(Errno.EINVAL, `invalid NBD URI '${uri}': ${why}`);
}

function percentDecode(uri: string, s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw invalid(uri, `bad percent-encoding in the ${what}`);
  }
}

/** Parses an NBD URI; throws NbddError (EINVAL, or ENOTSUP for vsock). */
export function parseNbdUri(uri: string): NbdUri {
  const m = SCHEME.exec(uri);
  if (!m) throw invalid(uri, 'the scheme must be nbd://, nbd+unix:// (or nbds…)');
  const tls = m[1]!.toLowerCase() === 'nbds';
  const transport = (m[2] ?? 'tcp').toLowerCase();
  if (transport === 'vsock') throw new NbddError(Errno.ENOTSUP, `'${uri}': AF_VSOCK transport is not supported`);

  let rest = uri.slice(m[0].length);
  const hash = rest.indexOf('#');
  if (hash >= 0) rest = rest.slice(0, hash);
  const q = rest.indexOf('?');
  const query = new URLSearchParams(q >= 0 ? rest.slice(q + 1) : '');
  if (q >= 0) rest = rest.slice(0, q);
  const slash = rest.indexOf('/');
  const authority = slash >= 0 ? rest.slice(0, slash) : rest;
  const path = slash >= 0 ? rest.slice(slash + 1) : '';
  const exportName = percentDecode(uri, path, 'export name');
  if (Buffer.byteLength(exportName) > LIMITS.maxString) throw invalid(uri, `export name longer than ${LIMITS.maxString} bytes`);
  const at = authority.lastIndexOf('@');
  const spec: ClientTlsSpec | undefined = tls ? tlsSpec(uri, query, at >= 0 ? percentDecode(uri, authority.slice(0, at), 'user name') : undefined) : undefined;
  const withTls = (u: NbdUri): NbdUri => (spec ? { ...u, tls: spec } : u);

  if (transport === 'unix') {
    if (authority !== '') throw invalid(uri, 'nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)');
    const socket = query.get('socket');
    if (!socket) throw invalid(uri, 'nbd+unix:// needs ?socket=PATH');
    return withTls({ transport: { kind: 'unix', path: socket }, exportName });
  }

  // authority = [userinfo@]host[:port]; the user name only matters for TLS, so it is dropped.
  const hostPort = authority.slice(authority.lastIndexOf('@') + 1);
  let host: string;
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw invalid(uri, 'unterminated [IPv6] host');
    host = hostPort.slice(1, close);
    const after = hostPort.slice(close + 1);
    if (after !== '' && !after.startsWith(':')) throw invalid(uri, 'junk after the [IPv6] host');
    portText = after ? after.slice(1) : undefined;
  } else {
    const colon = hostPort.lastIndexOf(':');
    host = colon >= 0 ? hostPort.slice(0, colon) : hostPort;
    portText = colon >= 0 ? hostPort.slice(colon + 1) : undefined;
  }
  host = percentDecode(uri, host, 'host');
  if (host === '') throw invalid(uri, 'nbd:// needs a host');
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== '') {
    if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
      throw invalid(uri, `bad port '${portText}'`);
    }
    port = Number(portText);
  }
  return withTls({ transport: { kind: 'tcp', host, port }, exportName });
}

function tlsSpec(uri: string, query: URLSearchParams, user: string | undefined): ClientTlsSpec {
  const verify = query.get('tls-verify-peer');
  if (verify !== null && !['true', 'false', '1', '0'].includes(verify)) throw invalid(uri, `tls-verify-peer must be true or false, not '${verify}'`);
  const spec: ClientTlsSpec = { verifyPeer: verify !== 'false' && verify !== '0' };
  const certificates = query.get('tls-certificates');
  const pskFile = query.get('tls-psk-file');
  if (certificates && pskFile) throw invalid(uri, 'tls-certificates and tls-psk-file exclude each other');
  if (certificates) spec.certificates = certificates;
  if (pskFile) spec.pskFile = pskFile;
  const username = query.get('tls-username') ?? user;
  if (username) spec.username = username;
  return spec;
}

/** The canonical URI of an export (for `nbdd info`), percent-encoding what needs it. */
export function formatNbdUri(u: NbdUri): string {
  const name = encodePath(u.exportName);
  const s = u.tls ? 'nbds' : 'nbd';
  if (u.transport.kind === 'unix') return `${s}+unix:///${name}?socket=${encodePath(u.transport.path)}`;
  const host = u.transport.host.includes(':') ? `[${u.transport.host}]` : u.transport.host;
  const port = u.transport.port === NBD_DEFAULT_PORT ? '' : `:${u.transport.port}`;
  return `${s}://${host}${port}/${name}`;
}

/** Percent-encodes each '/'-separated segment (keeping the slashes, as nbdinfo prints paths). */
function encodePath(s: string): string {
  return s.split('/').map(encodeURIComponent).join('/');
}
