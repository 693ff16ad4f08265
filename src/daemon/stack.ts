/**
 * Builds the request path for one image: backend → layers → BlockQueue. Every frontend (NBD
 * server, kernel NBD, ublk) takes its queue from here, so layers apply to all of them.
 */
import type { Backend } from '../core/backend.js';
import { BlockQueue, type QueueOptions } from '../core/queue.js';
import { openImage, type OpenOptions } from '../backends/open.js';

export interface StackOptions extends OpenOptions {
  queue?: QueueOptions;
}

export interface Stack {
  /** The image's own backend (bottom of the stack). */
  image: Backend;
  /** The top of the stack, what the queue drives. */
  top: Backend;
  queue: BlockQueue;
}

export async function openStack(image: string, options: StackOptions = {}): Promise<Stack> {
  const backend = await openImage(image, options);
  const top = backend;
  return { image: backend, top, queue: new BlockQueue(top, options.queue) };
}
