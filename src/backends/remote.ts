/**
 * What the rest of nbdd knows of remote (NBD) backends without loading the NBD client: the limits
 * the command line checks, and the link a backend keeps to its server, whose state the sidecar
 * shows and the device runtime announces. The backend itself (backends/nbd.ts, the client under
 * src/nbd/client) is loaded only when an image is an NBD URI or has one at the bottom of its chain.
 */
import type { RemoteEventType } from '../nbd/client/reconnecting.js';
import type { ImageLayer } from './qcow2/layer.js';

/** Most connections one backend opens (the kernel's nbd driver has as many queues). */
export const MAX_NBD_CONNECTIONS = 16;

/** Requests one backend has in flight to the server by default, over all its connections. */
export const DEFAULT_MAX_IN_FLIGHT = 128;

/** A backend whose data lives behind a network connection (the sidecar shows and announces its state). */
export interface RemoteLink {
  readonly remoteUri: string;
  readonly remoteState: string;
  readonly reconnects: number;
  onRemoteEvent(listener: (type: RemoteEventType, data: Record<string, unknown>) => void): void;
}

export function isRemoteLink(b: object): b is RemoteLink {
  return typeof (b as Partial<RemoteLink>).onRemoteEvent === 'function';
}

/**
 * The NBD connection a backend depends on, for status and events: the backend itself (an NBD
 * URI image) or the remote backing file at the bottom of its qcow2 chain; null for local images.
 */
export function remoteLinkOf(backend: object): RemoteLink | null {
  if (isRemoteLink(backend)) return backend;
  let layer = (backend as { backing?: ImageLayer | null }).backing ?? null;
  while (layer) {
    if (layer.remote) return layer.remote;
    layer = layer.backing;
  }
  return null;
}
