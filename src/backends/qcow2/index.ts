/** The qcow2 backend's public surface (see docs/qcow2.md). */
export { openQcow2, type OpenQcow2Options } from './open.js';
export { Qcow2Image, DEFAULT_L2_CACHE_BYTES } from './image.js';
export { createQcow2, type CreateQcow2Options } from './create.js';
export { describeQcow2, type Qcow2Description } from './describe.js';
export type { ImageLayer } from './layer.js';
