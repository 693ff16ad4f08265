/**
 * Receive buffers for a socket read through `net.Socket`'s `onread` option (the server's kernel
 * sockets and plain client connections, see `NbdSession.overSlab`; the client's plain sockets, see
 * `ByteStream`): each read lands in the unused tail of a slab, so a read allocates nothing and
 * skips Node's stream machinery, and the bytes it brought stay valid as views (the slab is never
 * written twice at the same place; a new one is started when the tail gets short). Both ends point
 * large payloads' reads at the payload's own buffer instead.
 *
 * A read whose bytes were all copied out or decoded on the spot (a large WRITE's header with the
 * first part of its payload, a READ reply's data) leaves nothing that points into the slab, so
 * its room is handed to the next read (`reuse`). Without that, each such read used up to a
 * region of fresh slab: 1 MiB writes at depth 8 made about 100 MiB/s of slabs for the GC, which
 * set the daemon's peak memory (40 MiB of them awaiting collection) and faulted in fresh pages.
 */
import net, { type Socket } from 'node:net';
import { setUnixSendBuffer } from '../sys/libc.js';
import type { ChunkReader } from './wire/reader.js';

const SLAB_BYTES = 1024 * 1024;
/**
 * Most one read may bring. Enough for a whole batch of small requests, and small enough that a
 * large WRITE's payload mostly lands in its own buffer (`NbdSession.overSlab`) rather than here,
 * where it must be copied out.
 */
const REGION = 64 * 1024;

export class ReadSlab {
  private slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
  private pos = 0;

  /** Where the next read may land: the start of the slab's unused tail. */
  region(): Buffer {
    if (this.slab.length - this.pos < REGION) {
      this.slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.pos = 0;
    }
    return this.slab.subarray(this.pos, this.pos + REGION);
  }

  /** `n` bytes landed at the start of the last region: returns them and moves past them. */
  take(n: number): Buffer {
    const bytes = this.slab.subarray(this.pos, this.pos + n);
    this.pos += n;
    return bytes;
  }

  /**
   * The `n` bytes that landed in the last region go to `handle`, which buffers them in `reader`
   * and consumes what it can. If then none of them is left buffered or lent out (all copied out or
   * decoded on the spot: a large WRITE's header and first payload bytes, READ data), the next read
   * lands on their room.
   */
  deliver(n: number, reader: ChunkReader, handle: (bytes: Buffer) => void): void {
    const bytes = this.take(n);
    const lent = reader.lent;
    handle(bytes);
    if (reader.length === 0 && reader.lent === lent) this.reuse(bytes);
  }

  /**
   * `bytes`, the last `take`, are no longer referenced by anyone: the next read may land on them.
   * Nothing happens for anything else (an older take, one of a previous slab).
   */
  reuse(bytes: Buffer): void {
    if (bytes.buffer === this.slab.buffer && bytes.byteOffset + bytes.length === this.slab.byteOffset + this.pos) this.pos -= bytes.length;
  }
}

/** Where a slab socket's reads land: `buffer()` says where the next one goes, `landed` hears of it. */
export interface SlabReads {
  buffer: () => Buffer;
  landed: (n: number, buf: Uint8Array) => void;
}

/**
 * A socket over `fd` whose reads land where `buffer()` says (a slab region, or a payload's own
 * buffer) and are reported to `landed`, without Node's stream machinery.
 */
export function slabSocket(fd: number, reads: SlabReads): Socket {
  return new net.Socket({ fd, readable: true, writable: true, ...onread(reads) } as net.SocketConstructorOpts);
}

/**
 * The same for a connection a `net.Server` accepted (paused: `pauseOnConnect`): the connection's
 * handle moves to a new socket that reads through `onread`, and the accepted socket, left without
 * it, is destroyed (which tells the server the connection is no longer its). Node lets no other
 * way give an accepted connection `onread`; where the handle is not there to move, null (the
 * caller keeps the stream socket).
 */
export function slabSocketFrom(accepted: Socket, reads: SlabReads): Socket | null {
  const holder = accepted as unknown as { _handle?: { readStart?: unknown } | null };
  const handle = holder._handle;
  if (!handle || typeof handle.readStart !== 'function' || accepted.destroyed) return null;
  const socket = new net.Socket({ handle, readable: true, writable: true, ...onread(reads) } as net.SocketConstructorOpts);
  holder._handle = null;
  accepted.destroy();
  return socket;
}

/** The descriptor under a socket's libuv handle, or -1 (no handle, or not one with a descriptor). */
export function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

/**
 * The send buffer asked for unix-domain connections (the kernel's socketpairs, local clients); the
 * kernel doubles it. The default (net.core.wmem_default, 208 KiB) takes a fifth of a 1 MiB READ
 * reply, so every such reply waited for the reader four times: 1 MiB reads at depth 8 measured
 * 2890–3155 MiB/s with this against 2394 without (buffered replies), 3400–4737 against 1481–1817
 * (spliced ones; docs/performance.md). The kernel's end of its socketpairs gets it as well
 * (src/kernel/device.ts), for the WRITEs the driver sends.
 */
export const UNIX_SEND_BUFFER = 2 * 1024 * 1024;

/**
 * The descriptor replies may be spliced into (src/io/pipes.ts), of a slab socket (plain for good),
 * or -1; a unix-domain one gets the larger send buffer on the way.
 */
export function spliceTarget(socket: Socket): number {
  const fd = socketFd(socket);
  if (fd >= 0) setUnixSendBuffer(fd, UNIX_SEND_BUFFER);
  return fd;
}

// `onread` is documented for net.Socket (Node >= 12) but missing from @types/node's constructor options.
function onread({ buffer, landed }: SlabReads): { onread: object } {
  return {
    onread: {
      buffer,
      callback: (n: number, buf: Uint8Array) => {
        landed(n, buf);
        return true;
      },
    },
  };
}
