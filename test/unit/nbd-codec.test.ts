import { describe, expect, it } from 'vitest';
import { IHAVEOPT, NBD_CMD_FLAG, NBD_INFO, NBD_OPT, NBD_REP, NBD_REPLY_TYPE, errnoFromNbdError, nbdErrorFromErrno } from '../../src/nbd/wire/constants.js';
import { Errno } from '../../src/core/errors.js';
import {
  ProtocolError,
  decodeGreeting,
  decodeInfo,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRepMetaContext,
  decodeRepServer,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from '../../src/nbd/wire/handshake.js';
import {
  decodeChunkPayload,
  decodeReplyHeader,
  decodeRequest,
  OFFSET_UNREPRESENTABLE,
  encodeChunkBlockStatus,
  encodeChunkError,
  encodeChunkNone,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeRequest,
  encodeSimpleReply,
} from '../../src/nbd/wire/transmission.js';

describe('handshake codec', () => {
  it('encodes the greeting byte for byte', () => {
    expect(encodeGreeting(3).toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
    expect(decodeGreeting(encodeGreeting(1))).toEqual({ handshakeFlags: 1 });
    expect(() => decodeGreeting(Buffer.alloc(18))).toThrow(ProtocolError);
  });

  it('round-trips options and checks the option magic', () => {
    const opt = encodeOption(NBD_OPT.GO, Buffer.from('abc'));
    expect(opt.readBigUInt64BE(0)).toBe(IHAVEOPT);
    expect(decodeOptionHeader(opt.subarray(0, 16))).toEqual({ option: NBD_OPT.GO, length: 3 });
    const bad = Buffer.from(opt);
    bad[0] ^= 1;
    expect(() => decodeOptionHeader(bad)).toThrow(/magic/);
  });

  it('round-trips INFO/GO requests and rejects inconsistent lengths', () => {
    const req = { exportName: 'disk ü', infos: [NBD_INFO.NAME, NBD_INFO.BLOCK_SIZE] };
    const enc = encodeInfoRequest(req);
    expect(decodeInfoRequest(enc)).toEqual(req);
    expect(() => decodeInfoRequest(enc.subarray(0, enc.length - 1))).toThrow(ProtocolError);
    expect(() => decodeInfoRequest(Buffer.concat([enc, Buffer.alloc(1)]))).toThrow(ProtocolError);
    const longName = Buffer.alloc(6);
    longName.writeUInt32BE(0xffffffff, 0);
    expect(() => decodeInfoRequest(longName)).toThrow(/runs past/);
    expect(() => decodeInfoRequest(Buffer.alloc(5))).toThrow(ProtocolError);
  });

  it('rejects names that are not UTF-8 or longer than 4096 bytes', () => {
    const bad = encodeInfoRequest({ exportName: 'x', infos: [] });
    bad[4] = 0xff;
    expect(() => decodeInfoRequest(bad)).toThrow(/UTF-8/);
    expect(() => decodeInfoRequest(encodeInfoRequest({ exportName: 'a'.repeat(4097), infos: [] }))).toThrow(/limit/);
  });

  it('round-trips meta-context requests and bounds the query count', () => {
    const req = { exportName: '', queries: ['base:allocation', 'qemu:dirty-bitmap:b0'] };
    expect(decodeMetaContextRequest(encodeMetaContextRequest(req))).toEqual(req);
    const many = Buffer.alloc(8);
    many.writeUInt32BE(100000, 4);
    expect(() => decodeMetaContextRequest(many)).toThrow(/limit/);
    const enc = encodeMetaContextRequest(req);
    expect(() => decodeMetaContextRequest(enc.subarray(0, enc.length - 2))).toThrow(ProtocolError);
  });

  it('encodes option replies and their payloads', () => {
    const rep = encodeOptionReply(NBD_OPT.LIST, NBD_REP.SERVER, encodeRepServer('a', 'desc'));
    expect(rep.subarray(0, 8).toString('hex')).toBe('0003e889045565a9');
    expect(decodeOptionReplyHeader(rep)).toEqual({ option: NBD_OPT.LIST, type: NBD_REP.SERVER, length: 9 });
    expect(decodeRepServer(rep.subarray(20))).toEqual({ name: 'a', description: 'desc' });
    expect(decodeRepMetaContext(encodeRepMetaContext(7, 'base:allocation'))).toEqual({ id: 7, name: 'base:allocation' });
  });

  it('encodes info payloads with the spec lengths', () => {
    expect(encodeInfoExport(1 << 20, 0x1ed).toString('hex')).toBe('0000' + '0000000000100000' + '01ed');
    expect(decodeInfo(encodeInfoExport(12345, 3))).toEqual({ type: NBD_INFO.EXPORT, size: 12345, flags: 3 });
    expect(decodeInfo(encodeInfoBlockSize(1, 4096, 1 << 25))).toEqual({ type: NBD_INFO.BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 1 << 25 });
    expect(decodeInfo(encodeInfoString(NBD_INFO.NAME, 'n'))).toEqual({ type: NBD_INFO.NAME, name: 'n' });
    expect(() => decodeInfo(Buffer.from('0000', 'hex'))).toThrow(ProtocolError);
  });

  it('pads the EXPORT_NAME reply unless NO_ZEROES was negotiated', () => {
    expect(encodeExportNameReply(512, 1, false).length).toBe(134);
    const short = encodeExportNameReply(512, 1, true);
    expect(short.toString('hex')).toBe('0000000000000200' + '0001');
  });
});

describe('transmission codec', () => {
  const header = { flags: 1, type: 1, cookieHi: 0xdeadbeef, cookieLo: 0x01020304, offset: 2 ** 40 + 5, length: 4096 };

  it('round-trips requests byte for byte', () => {
    const enc = encodeRequest(header);
    expect(enc.toString('hex')).toBe('25609513' + '0001' + '0001' + 'deadbeef01020304' + '0000010000000005' + '00001000');
    expect(decodeRequest(enc)).toEqual(header);
  });

  it('rejects a bad magic, and decodes offsets at or past 2^53 as unrepresentable (for an EINVAL reply)', () => {
    const enc = encodeRequest(header);
    enc.writeUInt32BE(0x12560953, 0);
    expect(() => decodeRequest(enc)).toThrow(/magic/);
    const far = encodeRequest(header);
    far.writeUInt32BE(0x200000, 16);
    expect(decodeRequest(far)).toEqual({ ...header, offset: OFFSET_UNREPRESENTABLE });
    far.writeUInt32BE(0x1fffff, 16);
    far.writeUInt32BE(0xffffffff, 20);
    expect(decodeRequest(far).offset).toBe(2 ** 53 - 1);
  });

  it('encodes simple replies and structured chunks that decode back', () => {
    expect(encodeSimpleReply(22, 1, 2).toString('hex')).toBe('67446698' + '00000016' + '0000000100000002');
    expect(decodeReplyHeader(encodeSimpleReply(0, 1, 2))).toEqual({ kind: 'simple', error: 0, cookieHi: 1, cookieLo: 2 });

    const none = encodeChunkNone(1, 2);
    expect(decodeReplyHeader(none)).toEqual({ kind: 'chunk', flags: 1, type: NBD_REPLY_TYPE.NONE, cookieHi: 1, cookieLo: 2, length: 0 });

    const dataHeader = encodeChunkOffsetDataHeader(1, 2, true, 4096, 3);
    const h = decodeReplyHeader(dataHeader);
    expect(h).toMatchObject({ kind: 'chunk', type: NBD_REPLY_TYPE.OFFSET_DATA, length: 11, flags: 1 });
    const payload = Buffer.concat([dataHeader.subarray(20), Buffer.from('abc')]);
    expect(decodeChunkPayload(NBD_REPLY_TYPE.OFFSET_DATA, payload)).toEqual({ type: NBD_REPLY_TYPE.OFFSET_DATA, offset: 4096, data: Buffer.from('abc') });

    const hole = encodeChunkOffsetHole(1, 2, false, 8192, 65536);
    expect(decodeChunkPayload(NBD_REPLY_TYPE.OFFSET_HOLE, hole.subarray(20))).toEqual({ type: NBD_REPLY_TYPE.OFFSET_HOLE, offset: 8192, size: 65536 });

    const bs = encodeChunkBlockStatus(1, 2, true, 3, [4096, 3, 8192, 0]);
    expect(bs.readUInt32BE(16)).toBe(4 + 16);
    expect(decodeChunkPayload(NBD_REPLY_TYPE.BLOCK_STATUS, bs.subarray(20))).toEqual({ type: NBD_REPLY_TYPE.BLOCK_STATUS, contextId: 3, extents: [4096, 3, 8192, 0] });

    const err = encodeChunkError(1, 2, true, 5, 'boom', 77);
    expect(decodeChunkPayload(NBD_REPLY_TYPE.ERROR_OFFSET, err.subarray(20))).toEqual({ type: NBD_REPLY_TYPE.ERROR, error: 5, message: 'boom', offset: 77 });
  });

  it('rejects malformed chunks', () => {
    expect(() => decodeChunkPayload(NBD_REPLY_TYPE.OFFSET_HOLE, Buffer.alloc(11))).toThrow(ProtocolError);
    expect(() => decodeChunkPayload(NBD_REPLY_TYPE.BLOCK_STATUS, Buffer.alloc(10))).toThrow(ProtocolError);
    expect(() => decodeChunkPayload(NBD_REPLY_TYPE.ERROR, Buffer.from('00000005000a41', 'hex'))).toThrow(ProtocolError);
    expect(decodeChunkPayload(0x8123, Buffer.alloc(0))).toEqual({ type: 'unknown', code: 0x8123, isError: true });
  });
});

describe('errno tables', () => {
  it('maps errno to the NBD wire and back', () => {
    expect(nbdErrorFromErrno(Errno.EROFS)).toBe(1);
    expect(nbdErrorFromErrno(Errno.ENOSPC)).toBe(28);
    expect(nbdErrorFromErrno(Errno.ENOTSUP, NBD_CMD_FLAG.FAST_ZERO)).toBe(95);
    // like nbdkit: ENOTSUP is only meaningful to a FAST_ZERO request, EOVERFLOW only to DF
    expect(nbdErrorFromErrno(Errno.ENOTSUP)).toBe(22);
    expect(nbdErrorFromErrno(Errno.EOVERFLOW, NBD_CMD_FLAG.DF)).toBe(75);
    expect(nbdErrorFromErrno(Errno.EOVERFLOW)).toBe(22);
    expect(nbdErrorFromErrno(Errno.ELOOP)).toBe(5);
    expect(errnoFromNbdError(22)).toBe(Errno.EINVAL);
    expect(errnoFromNbdError(9999)).toBe(Errno.EINVAL);
  });
});
