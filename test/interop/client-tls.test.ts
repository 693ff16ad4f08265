/**
 * nbdd as a TLS client (nbds:// and nbds+unix:// URIs, libnbd's query parameters) of real TLS
 * servers: nbdkit --tls=require (x509 and PSK), qemu-nbd --tls-creds (x509) and nbdd serve --tls.
 * Reads and writes byte-verified; a server whose certificate another CA signed, a wrong key and a
 * server without TLS are refused with a message that says which.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openNbd } from '../../src/backends/nbd.js';
import { Errno } from '../../src/core/errors.js';
import { makeTlsCreds, type TlsCreds } from '../helpers/tls-creds.js';
import { NBDD, requireTool, run, serveNbdd, tempDir } from '../helpers/tools.js';
import { startNbdkit } from './nbd-peers.js';

let dir: ReturnType<typeof tempDir>;
let creds: TlsCreds;

beforeAll(() => {
  for (const t of ['openssl', 'nbdkit', 'qemu-nbd']) requireTool(t);
  dir = tempDir('nbdd-client-tls-');
  creds = makeTlsCreds(dir.path);
});
afterAll(() => dir.remove());

/** Opens `uri`, writes and reads back a pattern, and closes. */
async function roundTrip(uri: string): Promise<void> {
  const b = await openNbd(uri);
  try {
    const data = Buffer.alloc(65536, 0x6b);
    await b.write(65536, data);
    await b.flush();
    expect((await b.read(65536, 65536)).equals(data)).toBe(true);
  } finally {
    await b.close();
  }
}

describe('nbds:// to nbdkit --tls=require', () => {
  it('x509: reads and writes over TLS; plaintext nbd:// is refused by the server', async () => {
    const peer = await startNbdkit(dir.path, ['--tls=require', `--tls-certificates=${creds.x509}`, 'memory', '16M']);
    try {
      await roundTrip(`nbds+unix:///?socket=${peer.socket}&tls-certificates=${creds.x509}`);
      await expect(openNbd(peer.uri)).rejects.toThrow(/TLS/);
    } finally {
      await peer.stop();
    }
  });

  it('PSK: reads and writes with the right key; a wrong key is refused, saying TLS failed', async () => {
    const peer = await startNbdkit(dir.path, ['--tls=require', `--tls-psk=${creds.pskFile}`, 'memory', '16M']);
    try {
      await roundTrip(`nbds+unix:///?socket=${peer.socket}&tls-psk-file=${creds.pskFile}&tls-username=alice`);
      await expect(openNbd(`nbds+unix:///?socket=${peer.socket}&tls-psk-file=${creds.wrongPskFile}&tls-username=alice`)).rejects.toMatchObject({
        errno: Errno.EACCES,
        message: /TLS with NBD server .* failed/,
      });
    } finally {
      await peer.stop();
    }
  });
});

describe('nbds:// to qemu-nbd --tls-creds (x509, TCP)', () => {
  it('reads and writes over TLS, checking the certificate names 127.0.0.1; another CA is refused', async () => {
    const image = join(dir.path, 'q.raw');
    run('truncate', ['-s', '16M', image]);
    const port = 20000 + Math.floor(Math.random() * 20000);
    const child = spawn('qemu-nbd', ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${creds.x509},verify-peer=off`, '--tls-creds', 'tls0', '-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-t', image], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 100; i++) {
        const r = await openNbd(`nbds://127.0.0.1:${port}/?tls-certificates=${creds.x509}`).catch(() => null);
        if (r) {
          await r.close();
          break;
        }
        await new Promise((res) => setTimeout(res, 100));
      }
      await roundTrip(`nbds://127.0.0.1:${port}/?tls-certificates=${creds.x509}`);
      await expect(openNbd(`nbds://127.0.0.1:${port}/?tls-certificates=${creds.otherCa}`)).rejects.toThrow(/TLS with NBD server .* failed: .*(self[- ]signed|unable to verify|certificate)/i);
    } finally {
      child.kill('SIGTERM');
    }
  });
});

describe('nbds:// to nbdd serve --tls', () => {
  it('nbdd to nbdd over TLS (x509 with a client certificate under --tls-verify-peer); `nbdd info` names the TLS URI', async () => {
    const image = join(dir.path, 'n.raw');
    run('truncate', ['-s', '8M', image]);
    const served = await serveNbdd(image, ['--tls', 'require', '--tls-certificates', creds.x509, '--tls-verify-peer']);
    try {
      const uri = `nbds+unix:///?socket=${served.socket}&tls-certificates=${creds.client}`;
      await roundTrip(uri);
      const info = JSON.parse(run(NBDD, ['info', uri, '--json'])) as { size: number; nbd?: { uri: string } };
      expect(info.size).toBe(8 << 20);
      expect(info.nbd?.uri).toMatch(/^nbds\+unix:\/\//);
      // Without a client certificate the server refuses.
      await expect(openNbd(`nbds+unix:///?socket=${served.socket}&tls-certificates=${creds.x509}&tls-verify-peer=false`)).rejects.toThrow(/TLS|closed|failed/);
    } finally {
      await served.stop();
    }
  });

  it('nbds:// to a server without TLS is refused with a message saying the server refused TLS', async () => {
    const image = join(dir.path, 'plain.raw');
    run('truncate', ['-s', '8M', image]);
    const served = await serveNbdd(image);
    try {
      await expect(openNbd(`nbds+unix:///?socket=${served.socket}&tls-certificates=${creds.x509}`)).rejects.toMatchObject({ message: /refused TLS \(NBD_OPT_STARTTLS/ });
    } finally {
      await served.stop();
    }
  });
});
