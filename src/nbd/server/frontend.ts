/**
 * The NBD server as a device frontend (`nbdd serve`): one export over the device's queue, on a
 * unix socket or TCP.
 */
import type { ServerTls } from '../tls.js';
import { Errno, NbddError } from '../../core/errors.js';
import type { Frontend, FrontendContext } from '../../runtime/device.js';
import { DIRTY_BITMAP_CONTEXT_PREFIX } from '../wire/contexts.js';
import { NbdExport } from './export.js';
import { NbdServer } from './server.js';

/** A unix socket path, a TCP address, or a listening socket handed over (systemd socket activation). */
export type Listen = { socket: string } | { host: string; port: number } | { fd: number };

export interface NbdServerFrontendOptions {
  exportName: string;
  description?: string;
  readOnly?: boolean;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  idleTimeoutMs?: number;
  /** TLS for client connections (src/nbd/tls.ts). */
  tls?: ServerTls | null;
  listen: Listen;
  /** Dirty bitmaps published on the export as `qemu:dirty-bitmap:NAME` (qemu-nbd's -B); each must exist. */
  bitmaps?: readonly string[];
}

/** The NBD URI a client uses to reach `exportName` at `where`. */
export function nbdUri(exportName: string, where: Exclude<Listen, { fd: number }>): string {
  const name = encodeURIComponent(exportName);
  if ('socket' in where) return `nbd+unix:///${name}?socket=${encodeURIComponent(where.socket)}`;
  const host = where.host.includes(':') ? `[${where.host}]` : where.host;
  return `nbd://${host}:${where.port}/${name}`;
}

export class NbdServerFrontend implements Frontend {
  readonly kind = 'nbd-server';
  private server: NbdServer | null = null;
  /** Where clients reach the export, once started (TCP port 0 resolved). */
  uri = '';

  constructor(private readonly options: NbdServerFrontendOptions) {}

  async start(ctx: FrontendContext): Promise<void> {
    const o = this.options;
    const { bitmaps, queue } = ctx.stack;
    const missing = (o.bitmaps ?? []).filter((b) => !bitmaps.has(b));
    if (missing.length > 0) {
      const known = bitmaps.list().map((b) => b.name);
      throw new NbddError(Errno.ENOENT, `bitmap '${missing[0]}' not found (the image has ${known.length ? known.map((n) => `'${n}'`).join(', ') : 'no bitmaps'})`);
    }
    const published = new Set((o.bitmaps ?? []).map((b) => DIRTY_BITMAP_CONTEXT_PREFIX + b));
    const server = new NbdServer({ maxConnections: o.maxConnections, handshakeTimeoutMs: o.handshakeTimeoutMs, idleTimeoutMs: o.idleTimeoutMs, tls: o.tls });
    server.addExport(
      new NbdExport({
        name: o.exportName,
        description: o.description,
        queue,
        readOnly: o.readOnly,
        ownsQueue: false,
        extraContexts: () => ctx.stack.metaContexts().filter((c) => published.has(c.name)),
      }),
    );
    try {
      if ('socket' in o.listen) {
        await server.listenUnix(o.listen.socket);
        this.uri = nbdUri(o.exportName, o.listen);
      } else if ('fd' in o.listen) {
        const address = await server.listenFd(o.listen.fd);
        this.uri = nbdUri(o.exportName, typeof address === 'string' ? { socket: address } : { host: address.address, port: address.port });
      } else {
        const port = await server.listenTcp(o.listen.port, o.listen.host);
        this.uri = nbdUri(o.exportName, { host: o.listen.host, port });
      }
    } catch (err) {
      await server.close();
      throw err;
    }
    this.server = server;
  }

  async stop(): Promise<void> {
    await this.server?.close();
  }

  status(): Record<string, unknown> {
    return { frontend: this.kind, uri: this.uri, connections: this.server?.connectionCount ?? 0 };
  }
}
