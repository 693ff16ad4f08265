/**
 * The ublk UAPI codecs against the kernel's numbers (../shared/reference.md §3.2, the table of
 * `_IOR/_IOWR('u', nr, struct)` values, and the struct layouts of include/uapi/linux/ublk_cmd.h).
 */
import { describe, expect, it } from 'vitest';
import {
  decodeDevInfo,
  DEV_INFO_SIZE,
  encodeDevInfo,
  encodeParams,
  parseUblkDevice,
  PARAMS_SIZE,
  requestInBounds,
  UBLK_ANY_ID,
  UBLK_CMD,
  UBLK_F,
  UBLK_IO,
  UBLK_OP,
} from '../../src/ublk/uapi.js';

describe('opcodes (ioctl-encoded, ≥ 6.4)', () => {
  it.each([
    ['GET_DEV_INFO', 0x80207502],
    ['ADD_DEV', 0xc0207504],
    ['DEL_DEV', 0xc0207505],
    ['START_DEV', 0xc0207506],
    ['STOP_DEV', 0xc0207507],
    ['SET_PARAMS', 0xc0207508],
    ['GET_PARAMS', 0x80207509],
    ['START_USER_RECOVERY', 0xc0207510],
    ['END_USER_RECOVERY', 0xc0207511],
    ['GET_DEV_INFO2', 0x80207512],
    ['GET_FEATURES', 0x80207513],
  ] as const)('%s = %s', (name, value) => {
    expect(UBLK_CMD[name]).toBe(value);
  });
  it('FETCH_REQ and COMMIT_AND_FETCH_REQ', () => {
    expect(UBLK_IO.FETCH_REQ).toBe(0xc0107520);
    expect(UBLK_IO.COMMIT_AND_FETCH_REQ).toBe(0xc0107521);
  });
});

describe('ublksrv_ctrl_dev_info (64 bytes)', () => {
  it('puts each field at its offset', () => {
    const b = encodeDevInfo({ nrHwQueues: 2, queueDepth: 128, maxIoBufBytes: 512 << 10, devId: 7, flags: UBLK_F.USER_RECOVERY | UBLK_F.CMD_IOCTL_ENCODE });
    expect(b.length).toBe(DEV_INFO_SIZE);
    expect(b.readUInt16LE(0)).toBe(2);
    expect(b.readUInt16LE(2)).toBe(128);
    expect(b.readUInt32LE(8)).toBe(512 << 10);
    expect(b.readUInt32LE(12)).toBe(7);
    expect(b.readBigUInt64LE(24)).toBe((1n << 3n) | (1n << 6n));
  });
  it('asks for any id when none is given', () => {
    expect(encodeDevInfo({}).readUInt32LE(12)).toBe(UBLK_ANY_ID);
  });
  it('decodes what the kernel writes, including state, pid and owner', () => {
    const b = Buffer.alloc(DEV_INFO_SIZE);
    b.writeUInt16LE(1, 0);
    b.writeUInt16LE(64, 2);
    b.writeUInt16LE(2, 4); // QUIESCED
    b.writeUInt32LE(1 << 20, 8);
    b.writeUInt32LE(3, 12);
    b.writeInt32LE(4242, 16);
    b.writeBigUInt64LE(0x58n, 24);
    b.writeUInt32LE(1000, 40);
    b.writeUInt32LE(1001, 44);
    expect(decodeDevInfo(b)).toEqual({
      nrHwQueues: 1,
      queueDepth: 64,
      state: 2,
      maxIoBufBytes: 1 << 20,
      devId: 3,
      ublksrvPid: 4242,
      flags: 0x58n,
      ublksrvFlags: 0n,
      ownerUid: 1000,
      ownerGid: 1001,
    });
  });
  it('refuses a short buffer', () => {
    expect(() => decodeDevInfo(Buffer.alloc(40))).toThrow(/64 bytes, got 40/);
  });
});

describe('ublk_params (basic at 8, discard at 40)', () => {
  const base = { sizeBytes: 64 << 20, logicalBlockShift: 9, physicalBlockShift: 12, maxSectors: 1024, readOnly: false, volatileCache: true, fua: true, maxDiscardSectors: 1 << 21, maxWriteZeroesSectors: 1 << 21, discardGranularity: 4096 };
  it('encodes len, types, attrs, shifts, max_sectors, dev_sectors and the discard limits', () => {
    const b = encodeParams(base);
    expect(b.length).toBe(PARAMS_SIZE);
    expect(b.readUInt32LE(0)).toBe(60);
    expect(b.readUInt32LE(4)).toBe(1 | 2);
    expect(b.readUInt32LE(8)).toBe(4 | 8); // VOLATILE_CACHE | FUA
    expect([b[12], b[13], b[14], b[15]]).toEqual([9, 12, 12, 9]);
    expect(b.readUInt32LE(16)).toBe(1024);
    expect(b.readBigUInt64LE(24)).toBe(BigInt((64 << 20) / 512));
    expect(b.readUInt32LE(44)).toBe(4096);
    expect(b.readUInt32LE(48)).toBe(1 << 21);
    expect(b.readUInt32LE(52)).toBe(1 << 21);
    expect(b.readUInt16LE(56)).toBe(1);
  });
  it('leaves the discard type out when both limits are 0, and marks a read-only device', () => {
    const b = encodeParams({ ...base, readOnly: true, volatileCache: false, fua: false, maxDiscardSectors: 0, maxWriteZeroesSectors: 0 });
    expect(b.readUInt32LE(4)).toBe(1);
    expect(b.readUInt32LE(8)).toBe(1);
    expect(b.readUInt32LE(48)).toBe(0);
  });
});

describe('requestInBounds', () => {
  const size = 64 << 20;
  const maxIo = 512 << 10;
  it('serves a FLUSH whatever its sector (the kernel leaves it at -1)', () => {
    expect(requestInBounds(UBLK_OP.FLUSH, 0xffffffffffffffff * 512, 0, size, maxIo)).toBe(true);
  });
  it('bounds READ and WRITE by the tag buffer and the device', () => {
    expect(requestInBounds(UBLK_OP.READ, 0, maxIo, size, maxIo)).toBe(true);
    expect(requestInBounds(UBLK_OP.WRITE, 0, maxIo + 512, size, maxIo)).toBe(false);
    expect(requestInBounds(UBLK_OP.READ, size - 4096, 8192, size, maxIo)).toBe(false);
  });
  it('lets DISCARD and WRITE_ZEROES exceed the buffer but not the device', () => {
    expect(requestInBounds(UBLK_OP.DISCARD, 0, 4 << 20, size, maxIo)).toBe(true);
    expect(requestInBounds(UBLK_OP.WRITE_ZEROES, 8 << 20, 4 << 20, size, maxIo)).toBe(true);
    expect(requestInBounds(UBLK_OP.DISCARD, size - 512, 1024, size, maxIo)).toBe(false);
  });
});

describe('parseUblkDevice', () => {
  it.each([
    ['/dev/ublkb3', 3],
    ['ublkb12', 12],
    ['ublk0', 0],
    ['/dev/nbd0', undefined],
    ['/dev/ublkc3', undefined],
    ['/dev/ublkb', undefined],
    ['/dev/ublkb1x', undefined],
  ])('%s → %s', (arg, id) => {
    expect(parseUblkDevice(arg)).toBe(id);
  });
});
