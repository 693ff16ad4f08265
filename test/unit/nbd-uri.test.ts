/** NBD URI parsing as libnbd's nbd_connect_uri reads them. */
import { describe, expect, it } from 'vitest';
import { Errno, NbddError } from '../../src/core/errors.js';
import { formatNbdUri, isNbdUri, parseNbdUri } from '../../src/nbd/uri.js';

function errnoOf(uri: string): number | undefined {
  try {
    parseNbdUri(uri);
  } catch (err) {
    return err instanceof NbddError ? err.errno : undefined;
  }
  return undefined;
}

describe('parseNbdUri', () => {
  it.each([
    ['nbd://localhost', { transport: { kind: 'tcp', host: 'localhost', port: 10809 }, exportName: '' }],
    ['nbd://localhost/', { transport: { kind: 'tcp', host: 'localhost', port: 10809 }, exportName: '' }],
    ['nbd://127.0.0.1:10900/disk', { transport: { kind: 'tcp', host: '127.0.0.1', port: 10900 }, exportName: 'disk' }],
    ['nbd://[::1]:2000/a%20b', { transport: { kind: 'tcp', host: '::1', port: 2000 }, exportName: 'a b' }],
    ['nbd://[::1]/x', { transport: { kind: 'tcp', host: '::1', port: 10809 }, exportName: 'x' }],
    ['nbd://user@host//abs/name', { transport: { kind: 'tcp', host: 'host', port: 10809 }, exportName: '/abs/name' }],
    ['NBD+TCP://h/e?tls-certificates=/x', { transport: { kind: 'tcp', host: 'h', port: 10809 }, exportName: 'e' }],
    ['nbd+unix:///?socket=/tmp/s.sock', { transport: { kind: 'unix', path: '/tmp/s.sock' }, exportName: '' }],
    ['nbd+unix:///exp%2Fa?socket=/tmp/a%20b.sock', { transport: { kind: 'unix', path: '/tmp/a b.sock' }, exportName: 'exp/a' }],
    ['nbd+unix:///e?foo=1&socket=%2Frun%2Fs', { transport: { kind: 'unix', path: '/run/s' }, exportName: 'e' }],
  ])('%s', (uri, expected) => {
    expect(parseNbdUri(uri)).toEqual(expected);
  });

  it('parses nbds:// with the TLS parameters of libnbd (user from the authority or tls-username)', () => {
    expect(parseNbdUri('nbds://alice@host/x?tls-psk-file=/k.psk')).toEqual({ transport: { kind: 'tcp', host: 'host', port: 10809 }, exportName: 'x', tls: { verifyPeer: true, pskFile: '/k.psk', username: 'alice' } });
    expect(parseNbdUri('nbds+unix:///x?socket=/s&tls-certificates=/d&tls-verify-peer=false&tls-username=bob')).toEqual({
      transport: { kind: 'unix', path: '/s' },
      exportName: 'x',
      tls: { verifyPeer: false, certificates: '/d', username: 'bob' },
    });
    expect(parseNbdUri('nbds://h/').tls).toEqual({ verifyPeer: true });
    expect(() => parseNbdUri('nbds://h/?tls-certificates=/d&tls-psk-file=/k')).toThrow(/exclude each other/);
    expect(() => parseNbdUri('nbds://h/?tls-verify-peer=maybe')).toThrow(/tls-verify-peer must be true or false/);
    expect(parseNbdUri('nbd://h/x?tls-certificates=/d').tls).toBeUndefined(); // plain nbd:// ignores them, as libnbd
  });

  it('refuses vsock with ENOTSUP and a clear message', () => {
    expect(errnoOf('nbd+vsock://2/x')).toBe(Errno.ENOTSUP);
  });

  it.each([
    'http://host/x',
    'nbd://',
    'nbd://:10809/x',
    'nbd://host:0/x',
    'nbd://host:65536/x',
    'nbd://host:abc/x',
    'nbd://[::1/x',
    'nbd://[::1]x/y',
    'nbd+unix:///x',
    'nbd+unix://host/x?socket=/s',
    'nbd://host/%zz',
    `nbd://host/${'a'.repeat(4097)}`,
  ])('rejects %s with EINVAL', (uri) => {
    expect(errnoOf(uri)).toBe(Errno.EINVAL);
  });

  it('recognises NBD URIs by scheme only', () => {
    expect(isNbdUri('nbd://h/x')).toBe(true);
    expect(isNbdUri('nbd+unix:///?socket=/s')).toBe(true);
    expect(isNbdUri('nbds://h')).toBe(true);
    expect(isNbdUri('/var/lib/disk.qcow2')).toBe(false);
    expect(isNbdUri('memory:64M')).toBe(false);
    expect(isNbdUri('nbd.qcow2')).toBe(false);
  });

  it('formats URIs that parse back to the same thing', () => {
    for (const uri of ['nbd://[::1]:2000/a%20b', 'nbd+unix:///e%3Fx?socket=/tmp/a%26b.sock', 'nbd://h/']) {
      const parsed = parseNbdUri(uri);
      expect(parseNbdUri(formatNbdUri(parsed))).toEqual(parsed);
    }
    expect(formatNbdUri(parseNbdUri('nbd://h:10809/x'))).toBe('nbd://h/x');
  });
});
