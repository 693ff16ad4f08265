/**
 * Builds the request path for one image: backend → layers → BlockQueue. Every frontend (NBD
 * server, kernel NBD, ublk) takes its queue from here, so layers apply to all of them.
 */
import type { Backend } from '../core/backend.js';
import { BlockQueue, type QueueOptions } from '../core/queue.js';
import { openImage, type OpenOptions } from '../backends/open.js';
import { BitmapSet } from '../bitmaps/bitmap-set.js';
import { openBitmapStore } from '../sidecar/bitmap-store-select.js';
import { buildStack, type LayerStack } from '../sidecar/stack.js';

export interface StackOptions extends OpenOptions {
  queue?: QueueOptions;
  /** Keep persistent dirty bitmaps in this sidecar file (default: see bitmap-store-select.ts). */
  bitmapStore?: string;
}

export interface Stack {
  /** The image's own backend (bottom of the stack). */
  image: Backend;
  /** The top of the stack, what the queue drives. */
  top: Backend;
  queue: BlockQueue;
  /** The layers (stats, dirty tracking, copy-before-write) between the queue and the image. */
  layers: LayerStack;
  bitmaps: BitmapSet;
}

export async function openStack(image: string, options: StackOptions = {}): Promise<Stack> {
  const backend = await openImage(image, options);
  let bitmaps: BitmapSet;
  try {
    bitmaps = await BitmapSet.open(backend.size, await openBitmapStore(image, backend, { path: options.bitmapStore }));
  } catch (err) {
    await backend.close();
    throw err;
  }
  const layers = buildStack(backend, bitmaps);
  return { image: backend, top: layers.top, queue: new BlockQueue(layers.top, options.queue), layers, bitmaps };
}
