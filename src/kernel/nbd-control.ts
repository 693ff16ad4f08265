/**
 * Control of the kernel NBD driver over its generic-netlink family: CONNECT, RECONFIGURE,
 * DISCONNECT, STATUS, and LINK_DEAD notifications. Slow-path code: each call is one synchronous
 * request on a netlink socket; nothing here touches the data path.
 *
 * Kernel errnos become sentences a person can act on (module not loaded, not root, device busy).
 */
import { readFileSync } from 'node:fs';
import { Errno, NbddError } from '../core/errors.js';
import { logger } from '../core/log.js';
import { NBD_GENL_FAMILY_NAME, NBD_GENL_MCAST_GROUP_NAME } from '../netlink/constants.js';
import {
  decodeConnectReply,
  decodeLinkDead,
  decodeStatusReply,
  nbdConnectCommand,
  nbdDisconnectCommand,
  nbdReconfigureCommand,
  nbdStatusCommand,
  type NbdConnectParams,
  type NbdDeviceStatus,
  type NbdReconfigureParams,
} from '../netlink/nbd-messages.js';
import { GenlSocket, NetlinkError } from '../sys/netlink-socket.js';

const log = logger('kernel');

export const MODULE_MISSING = 'the nbd kernel module is not loaded: modprobe nbd';
export const NEEDS_ROOT = 'attaching needs root or CAP_SYS_ADMIN';

const CAP_SYS_ADMIN = 21;

/**
 * Fails with the NEEDS_ROOT advice unless this process has CAP_SYS_ADMIN in its effective set
 * (what the kernel checks for CONNECT, RECONFIGURE and DISCONNECT). Checked before anything is
 * created, so an unprivileged user gets that message rather than an error from a later step.
 */
export function requireSysAdmin(): void {
  const caps = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  if (caps && (BigInt(`0x${caps[1]}`) >> BigInt(CAP_SYS_ADMIN)) & 1n) return;
  throw new NbddError(Errno.EPERM, NEEDS_ROOT);
}

export function devicePath(index: number): string {
  return `/dev/nbd${index}`;
}

/** Rewrites a failed request's errno as advice; other errors pass through unchanged. */
function explain(err: unknown, what: string, index?: number): unknown {
  if (!(err instanceof NetlinkError)) return err;
  const dev = index === undefined ? 'the device' : devicePath(index);
  const detail = err.kernelMessage ? ` (kernel: ${err.kernelMessage})` : '';
  switch (err.errno) {
    case Errno.EPERM:
    case Errno.EACCES:
      return new NbddError(err.errno, `${what}: ${NEEDS_ROOT}`, { cause: err });
    case Errno.EBUSY:
      return new NbddError(err.errno, `${what}: ${dev} is in use (already connected); pick another --device or detach it first`, { cause: err });
    case Errno.EINVAL:
      return new NbddError(err.errno, `${what}: the kernel refused the request for ${dev} (EINVAL)${detail}`, { cause: err });
    default:
      return new NbddError(err.errno, `${what}: ${err.message}`, { cause: err });
  }
}

/** One netlink socket bound to the resolved "nbd" family. Close it when done. */
export class NbdControl {
  private constructor(
    private readonly sock: GenlSocket,
    readonly familyId: number,
    readonly groups: ReadonlyMap<string, number>,
  ) {}

  /** Opens a socket and resolves the family; ENOENT there means the module is not loaded. */
  static open(): NbdControl {
    const sock = GenlSocket.open();
    try {
      const fam = sock.resolveFamily(NBD_GENL_FAMILY_NAME);
      return new NbdControl(sock, fam.id, fam.groups);
    } catch (err) {
      sock.close();
      if (err instanceof NetlinkError && err.errno === Errno.ENOENT) throw new NbddError(Errno.ENODEV, MODULE_MISSING, { cause: err });
      throw err;
    }
  }

  /** CONNECT; returns the index of the configured device (the kernel's choice when none given). */
  connect(params: NbdConnectParams): number {
    const what = params.index === undefined ? 'connecting an nbd device' : `connecting ${devicePath(params.index)}`;
    try {
      const replies = this.sock.request(nbdConnectCommand(this.familyId, params), what);
      if (replies.length === 0) throw new NbddError(Errno.EPROTO, `${what}: the kernel did not say which device it configured`);
      return decodeConnectReply(replies[0]!);
    } catch (err) {
      throw explain(err, what, params.index);
    }
  }

  /** RECONFIGURE with fresh sockets (and the creator's backend identifier). */
  reconfigure(params: NbdReconfigureParams): void {
    const what = `reconfiguring ${devicePath(params.index)}`;
    try {
      this.sock.request(nbdReconfigureCommand(this.familyId, params), what);
    } catch (err) {
      if (err instanceof NetlinkError && err.errno === Errno.EINVAL) {
        throw new NbddError(
          Errno.EINVAL,
          `${what}: the kernel refused (EINVAL): the device is not connected through netlink, or was connected with another backend identifier`,
          { cause: err },
        );
      }
      throw explain(err, what, params.index);
    }
  }

  disconnect(index: number): void {
    const what = `disconnecting ${devicePath(index)}`;
    try {
      this.sock.request(nbdDisconnectCommand(this.familyId, index), what);
    } catch (err) {
      if (err instanceof NetlinkError && err.errno === Errno.EINVAL) throw new NbddError(Errno.ENODEV, `${what}: no such device`, { cause: err });
      throw explain(err, what, index);
    }
  }

  /** STATUS of one device, or of all when `index` is omitted. */
  status(index?: number): NbdDeviceStatus[] {
    const what = index === undefined ? 'listing nbd devices' : `reading the status of ${devicePath(index)}`;
    try {
      return this.sock.request(nbdStatusCommand(this.familyId, index), what).flatMap(decodeStatusReply);
    } catch (err) {
      throw explain(err, what, index);
    }
  }

  close(): void {
    this.sock.close();
  }
}

/**
 * Listens for LINK_DEAD multicasts (a device lost a connection: the server side closed, a send
 * failed, or a request timed out) on its own socket. The socket is polled without blocking every
 * `intervalMs`; the timer is unref'd so it never keeps the process alive.
 */
export class LinkDeadListener {
  private readonly sock: GenlSocket;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly familyId: number,
    groupId: number,
    onDead: (index: number) => void,
    intervalMs = 250,
  ) {
    this.sock = GenlSocket.open();
    this.sock.joinGroup(groupId);
    this.timer = setInterval(() => {
      try {
        for (const msg of this.sock.poll(this.familyId)) {
          const index = decodeLinkDead(msg);
          if (index !== null) onDead(index);
        }
      } catch (err) {
        log.warn(`link-dead listener: ${(err as Error).message}`);
      }
    }, intervalMs);
    this.timer.unref();
  }

  /** For a control whose family advertises the nbd multicast group. */
  static forControl(control: NbdControl, onDead: (index: number) => void): LinkDeadListener {
    const group = control.groups.get(NBD_GENL_MCAST_GROUP_NAME);
    if (group === undefined) throw new NbddError(Errno.EPROTO, `the nbd family has no '${NBD_GENL_MCAST_GROUP_NAME}' group`);
    return new LinkDeadListener(control.familyId, group, onDead);
  }

  close(): void {
    clearInterval(this.timer);
    this.sock.close();
  }
}
