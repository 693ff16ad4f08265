/**
 * The ublk UAPI (include/uapi/linux/ublk_cmd.h, Linux 6.12): opcodes, flags and the layouts of
 * the structures nbdd sends and reads, as pure codecs (unit-tested in test/unit/ublk-uapi.test.ts).
 * Facts and sources: ../shared/reference.md §3.
 */

/** `_IOC(dir, 'u', nr, size)`: the ioctl-style encoding 6.4+ drivers use (UBLK_F_CMD_IOCTL_ENCODE). */
function ioc(dir: number, nr: number, size: number): number {
  return ((dir << 30) | (size << 16) | (0x75 << 8) | nr) >>> 0;
}
const IOR = 2;
const IOWR = 3;
const CTRL_CMD = 32;
const IO_CMD = 16;

export const UBLK_CMD = {
  GET_DEV_INFO: ioc(IOR, 0x02, CTRL_CMD),
  ADD_DEV: ioc(IOWR, 0x04, CTRL_CMD),
  DEL_DEV: ioc(IOWR, 0x05, CTRL_CMD),
  START_DEV: ioc(IOWR, 0x06, CTRL_CMD),
  STOP_DEV: ioc(IOWR, 0x07, CTRL_CMD),
  SET_PARAMS: ioc(IOWR, 0x08, CTRL_CMD),
  GET_PARAMS: ioc(IOR, 0x09, CTRL_CMD),
  START_USER_RECOVERY: ioc(IOWR, 0x10, CTRL_CMD),
  END_USER_RECOVERY: ioc(IOWR, 0x11, CTRL_CMD),
  GET_DEV_INFO2: ioc(IOR, 0x12, CTRL_CMD),
  GET_FEATURES: ioc(IOR, 0x13, CTRL_CMD),
} as const;

export const UBLK_IO = {
  FETCH_REQ: ioc(IOWR, 0x20, IO_CMD),
  COMMIT_AND_FETCH_REQ: ioc(IOWR, 0x21, IO_CMD),
} as const;

export const UBLK_F = {
  SUPPORT_ZERO_COPY: 1n << 0n,
  URING_CMD_COMP_IN_TASK: 1n << 1n,
  NEED_GET_DATA: 1n << 2n,
  USER_RECOVERY: 1n << 3n,
  USER_RECOVERY_REISSUE: 1n << 4n,
  UNPRIVILEGED_DEV: 1n << 5n,
  CMD_IOCTL_ENCODE: 1n << 6n,
  USER_COPY: 1n << 7n,
} as const;

export const UBLK_ATTR = { READ_ONLY: 1, ROTATIONAL: 2, VOLATILE_CACHE: 4, FUA: 8 } as const;
export const UBLK_PARAM_TYPE = { BASIC: 1, DISCARD: 2 } as const;
export const UBLK_STATE = { DEAD: 0, LIVE: 1, QUIESCED: 2, FAIL_IO: 3 } as const;
export const UBLK_STATE_NAME: Record<number, string> = { 0: 'dead', 1: 'live', 2: 'quiesced', 3: 'fail-io' };

export const UBLK_OP = { READ: 0, WRITE: 1, FLUSH: 2, DISCARD: 3, WRITE_SAME: 4, WRITE_ZEROES: 5 } as const;
/** Flag bits of `op_flags` above the op byte. */
export const UBLK_IO_F = { FUA: 1 << 13, NOUNMAP: 1 << 15 } as const;

/** Any device id, for ADD_DEV. */
export const UBLK_ANY_ID = 0xffffffff;
/** "No queue" in the control header. */
export const UBLK_NO_QUEUE = 0xffff;
export const UBLK_MAX_QUEUE_DEPTH = 4096;
export const SECTOR_SHIFT = 9;

/** struct ublksrv_ctrl_dev_info, 64 bytes. */
export interface DevInfo {
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  devId: number;
  ublksrvPid: number;
  flags: bigint;
  /** Free for the server: nbdd keeps nothing here. */
  ublksrvFlags: bigint;
  ownerUid: number;
  ownerGid: number;
}
export const DEV_INFO_SIZE = 64;

export function encodeDevInfo(info: Partial<DevInfo>): Buffer {
  const b = Buffer.alloc(DEV_INFO_SIZE);
  b.writeUInt16LE(info.nrHwQueues ?? 0, 0);
  b.writeUInt16LE(info.queueDepth ?? 0, 2);
  b.writeUInt16LE(info.state ?? 0, 4);
  b.writeUInt32LE(info.maxIoBufBytes ?? 0, 8);
  b.writeUInt32LE(info.devId ?? UBLK_ANY_ID, 12);
  b.writeInt32LE(info.ublksrvPid ?? 0, 16);
  b.writeBigUInt64LE(info.flags ?? 0n, 24);
  b.writeBigUInt64LE(info.ublksrvFlags ?? 0n, 32);
  return b;
}

export function decodeDevInfo(b: Buffer): DevInfo {
  if (b.length < DEV_INFO_SIZE) throw new RangeError(`ublksrv_ctrl_dev_info is ${DEV_INFO_SIZE} bytes, got ${b.length}`);
  return {
    nrHwQueues: b.readUInt16LE(0),
    queueDepth: b.readUInt16LE(2),
    state: b.readUInt16LE(4),
    maxIoBufBytes: b.readUInt32LE(8),
    devId: b.readUInt32LE(12),
    ublksrvPid: b.readInt32LE(16),
    flags: b.readBigUInt64LE(24),
    ublksrvFlags: b.readBigUInt64LE(32),
    ownerUid: b.readUInt32LE(40),
    ownerGid: b.readUInt32LE(44),
  };
}

/** What nbdd sets with SET_PARAMS (basic + discard). */
export interface DeviceParams {
  sizeBytes: number;
  logicalBlockShift: number;
  physicalBlockShift: number;
  /** Largest request in 512-byte sectors (≤ max_io_buf_bytes / 512). */
  maxSectors: number;
  readOnly: boolean;
  /** FLUSH requests (a volatile cache) and FUA writes reach the server. */
  volatileCache: boolean;
  fua: boolean;
  /** Discard / write-zeroes limits in sectors; 0 turns the operation off. */
  maxDiscardSectors: number;
  maxWriteZeroesSectors: number;
  discardGranularity: number;
  ioOptShift?: number;
  ioMinShift?: number;
}
/** struct ublk_params up to and including `discard` (len tells the kernel how much we send). */
export const PARAMS_SIZE = 8 + 32 + 20;

export function encodeParams(p: DeviceParams): Buffer {
  const b = Buffer.alloc(PARAMS_SIZE);
  const discard = p.maxDiscardSectors > 0 || p.maxWriteZeroesSectors > 0;
  b.writeUInt32LE(PARAMS_SIZE, 0);
  b.writeUInt32LE(UBLK_PARAM_TYPE.BASIC | (discard ? UBLK_PARAM_TYPE.DISCARD : 0), 4);
  let attrs = 0;
  if (p.readOnly) attrs |= UBLK_ATTR.READ_ONLY;
  if (p.volatileCache) attrs |= UBLK_ATTR.VOLATILE_CACHE;
  if (p.fua) attrs |= UBLK_ATTR.FUA;
  const basic = 8;
  b.writeUInt32LE(attrs, basic);
  b.writeUInt8(p.logicalBlockShift, basic + 4);
  b.writeUInt8(p.physicalBlockShift, basic + 5);
  b.writeUInt8(p.ioOptShift ?? p.physicalBlockShift, basic + 6);
  b.writeUInt8(p.ioMinShift ?? p.logicalBlockShift, basic + 7);
  b.writeUInt32LE(p.maxSectors, basic + 8);
  b.writeUInt32LE(0, basic + 12); // chunk_sectors
  b.writeBigUInt64LE(BigInt(Math.floor(p.sizeBytes / 512)), basic + 16);
  b.writeBigUInt64LE(0n, basic + 24); // virt_boundary_mask
  if (discard) {
    const d = basic + 32;
    b.writeUInt32LE(0, d); // discard_alignment
    b.writeUInt32LE(p.discardGranularity, d + 4);
    b.writeUInt32LE(p.maxDiscardSectors, d + 8);
    b.writeUInt32LE(p.maxWriteZeroesSectors, d + 12);
    b.writeUInt16LE(1, d + 16); // max_discard_segments
  }
  return b;
}

/**
 * Whether a request's range is one nbdd may serve: inside the device, and — for READ and WRITE,
 * the ops that move data through the tag's buffer — no larger than that buffer. A FLUSH carries
 * no range (the kernel leaves its sector at -1, blk_rq_init); DISCARD and WRITE_ZEROES are
 * bounded by the discard limits, not by the buffer.
 */
export function requestInBounds(op: number, offset: number, length: number, size: number, maxIo: number): boolean {
  if (op === UBLK_OP.FLUSH) return true;
  if (offset + length > size) return false;
  return (op !== UBLK_OP.READ && op !== UBLK_OP.WRITE) || length <= maxIo;
}

/** One request as the queue thread delivers it (5 words: tag, op_flags, nr_sectors, sector lo, hi). */
export const REC_WORDS = 5;

export function ublkDevicePath(id: number): string {
  return `/dev/ublkb${id}`;
}
export function ublkCharPath(id: number): string {
  return `/dev/ublkc${id}`;
}

/** /dev/ublkbN, ublkbN, ublkN → N; anything else undefined. */
export function parseUblkDevice(arg: string): number | undefined {
  const m = /^(?:\/dev\/)?ublkb?(\d{1,7})$/.exec(arg);
  return m ? Number(m[1]) : undefined;
}
