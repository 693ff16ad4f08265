/**
 * What format a local image file is, from its first bytes: qcow2 when they are the qcow2 magic,
 * else raw (qemu-img's probe for the two formats nbdd opens). Kept apart from the qcow2 backend so
 * that probing a raw image does not load it.
 */
import { fileError } from '../core/errors.js';
import { NodeFilePort } from '../io/file-port.js';
import { QCOW2_MAGIC } from './qcow2/format/header.js';

/** 'qcow2' when the file starts with the qcow2 magic, else 'raw'. */
export async function probeFormat(path: string): Promise<'qcow2' | 'raw'> {
  const port = await NodeFilePort.open(path, { readOnly: true }).catch((err: unknown) => {
    throw fileError(path, err);
  });
  try {
    const head = await port.readAt(Buffer.alloc(4), 0).catch((err: unknown) => {
      throw fileError(path, err, 'cannot read');
    });
    return head.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await port.close();
  }
}
