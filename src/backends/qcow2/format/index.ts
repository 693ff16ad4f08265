/** The qcow2 on-disk structures: header, extensions, tables, bitmaps. Pure codecs, no I/O. */
export * from './header.js';
export * from './extensions.js';
export * from './tables.js';
export * from './bitmaps.js';
