import { readFileSync, existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { decodeGenl, decodeMessages, encodeGenlMessage, nla } from '../../src/netlink/codec.js';
import * as K from '../../src/netlink/constants.js';
import {
  decodeConnectReply,
  decodeLinkDead,
  decodeStatusReply,
  nbdConnectCommand,
  nbdDisconnectCommand,
  nbdReconfigureCommand,
  nbdStatusCommand,
} from '../../src/netlink/nbd-messages.js';
import type { GenlCommand } from '../../src/netlink/nlctrl.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const FAMILY = 0x1d;
const wire = (cmd: GenlCommand, seq = 7): Buffer => encodeGenlMessage({ ...cmd, flags: K.NLM_F.REQUEST | K.NLM_F.ACK, seq });

describe('nbd family requests, byte for byte', () => {
  it('CONNECT without an index, two sockets, timeouts, flags and a backend identifier', () => {
    const msg = wire(
      nbdConnectCommand(FAMILY, {
        sizeBytes: 64 << 20,
        blockSize: 4096,
        serverFlags: 0x0161, // HAS_FLAGS | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
        clientFlags: K.NBD_CFLAG.DISCONNECT_ON_CLOSE,
        timeoutS: 30,
        deadConnTimeoutS: 60,
        backendId: 'nbdd:a',
        sockets: [5, 6],
      }),
    );
    expect(msg).toEqual(
      hex(`
      84000000 1d00 0500 07000000 00000000
      01 01 0000
      0c00 0200 0000000400000000
      0c00 0300 0010000000000000
      0c00 0500 6101000000000000
      0c00 0600 0200000000000000
      0c00 0400 1e00000000000000
      0c00 0800 3c00000000000000
      0b00 0a00 6e6264643a6100 00
      1c00 0780  0c00 0180 0800 0100 05000000  0c00 0180 0800 0100 06000000`),
    );
  });

  it('CONNECT with an explicit index puts NBD_ATTR_INDEX first', () => {
    const msg = wire(nbdConnectCommand(FAMILY, { index: 3, sizeBytes: 1 << 20, serverFlags: 1, sockets: [9] }));
    expect(msg).toEqual(
      hex(`
      44000000 1d00 0500 07000000 00000000
      01 01 0000
      0800 0100 03000000
      0c00 0200 0000100000000000
      0c00 0500 0100000000000000
      1000 0780  0c00 0180 0800 0100 09000000`),
    );
  });

  it('RECONFIGURE, DISCONNECT and STATUS', () => {
    expect(wire(nbdReconfigureCommand(FAMILY, { index: 2, backendId: 'x', deadConnTimeoutS: 5, sockets: [4] }))).toEqual(
      hex(`
      40000000 1d00 0500 07000000 00000000
      03 01 0000
      0800 0100 02000000
      0c00 0800 0500000000000000
      0600 0a00 7800 0000
      1000 0780  0c00 0180 0800 0100 04000000`),
    );
    expect(wire(nbdDisconnectCommand(FAMILY, 12))).toEqual(hex('1c000000 1d00 0500 07000000 00000000 02 01 0000 0800 0100 0c000000'));
    expect(wire(nbdStatusCommand(FAMILY))).toEqual(hex('14000000 1d00 0500 07000000 00000000 05 01 0000'));
    expect(wire(nbdStatusCommand(FAMILY, 1))).toEqual(hex('1c000000 1d00 0500 07000000 00000000 05 01 0000 0800 0100 01000000'));
  });

  it('validates at the edge: index range, sizes, block size, sockets, identifier', () => {
    const base = { sizeBytes: 1 << 20, serverFlags: 1, sockets: [3] };
    expect(() => nbdConnectCommand(FAMILY, { ...base, index: -1 })).toThrow(/out of range/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, index: K.NBD_MAX_INDEX + 1 })).toThrow(/out of range/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, sizeBytes: 0 })).toThrow(/bad device size/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, blockSize: 1000 })).toThrow(/power of two/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, sockets: [] })).toThrow(/at least one socket/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, backendId: 'a\nb' })).toThrow(/backend identifier/);
    expect(() => nbdConnectCommand(FAMILY, { ...base, timeoutS: 1.5 })).toThrow(/whole seconds/);
  });
});

describe('nbd family replies', () => {
  const reply = (cmd: number, attrs: ReturnType<typeof nla.u32>[]) =>
    decodeGenl(decodeMessages(encodeGenlMessage({ family: FAMILY, cmd, version: 1, flags: 0, seq: 7, attrs }))[0]!.payload);

  it('CONNECT reply gives the index', () => {
    expect(decodeConnectReply(reply(K.NBD_GENL_CMD.CONNECT, [nla.u32(K.NBD_ATTR.INDEX, 4)]))).toBe(4);
    expect(() => decodeConnectReply(reply(K.NBD_GENL_CMD.CONNECT, []))).toThrow(/without NBD_ATTR_INDEX/);
  });

  it('STATUS reply as the kernel nests it (no NLA_F_NESTED)', () => {
    // nla_nest_start_noflag: DEVICE_LIST { DEVICE_ITEM { INDEX 0, CONNECTED 1 }, DEVICE_ITEM { INDEX 1, CONNECTED 0 } }
    const payload = hex(`
      05 01 0000
      2c00 0900
        1400 0100  0800 0100 00000000  0500 0200 01 000000
        1400 0100  0800 0100 01000000  0500 0200 00 000000`);
    expect(decodeStatusReply(decodeGenl(payload))).toEqual([
      { index: 0, connected: true },
      { index: 1, connected: false },
    ]);
  });

  it('LINK_DEAD gives the index; other commands give null', () => {
    expect(decodeLinkDead(reply(K.NBD_GENL_CMD.LINK_DEAD, [nla.u32(K.NBD_ATTR.INDEX, 2)]))).toBe(2);
    expect(decodeLinkDead(reply(K.NBD_GENL_CMD.STATUS, []))).toBeNull();
  });
});

describe('constants agree with the installed UAPI headers', () => {
  /** Values of a C enum, in order, from a header's text (first enum whose first member is `first`). */
  function enumValues(header: string, first: string): Map<string, number> {
    const text = readFileSync(header, 'utf8');
    const body = new RegExp(`enum\\s*\\{\\s*(${first}\\b[^}]*)\\}`).exec(text);
    if (!body) throw new Error(`${first} not found in ${header}`);
    const out = new Map<string, number>();
    let next = 0;
    for (const raw of body[1]!.split(',')) {
      const line = raw.replace(/\/\*[\s\S]*?\*\//g, '').trim();
      if (!line) continue;
      const [name, value] = line.split('=').map((s) => s.trim());
      next = value !== undefined ? Number(value) : next;
      out.set(name!, next++);
    }
    return out;
  }

  const header = '/usr/include/linux/nbd-netlink.h';
  it('has linux-libc-dev installed (apt-get install linux-libc-dev)', () => {
    expect(existsSync(header)).toBe(true);
  });

  it('NBD_ATTR_*, NBD_CMD_*, item and device attributes', () => {
    const attrs = enumValues(header, 'NBD_ATTR_UNSPEC');
    for (const [k, v] of Object.entries(K.NBD_ATTR)) expect(attrs.get(`NBD_ATTR_${k}`), k).toBe(v);
    const cmds = enumValues(header, 'NBD_CMD_UNSPEC');
    for (const [k, v] of Object.entries(K.NBD_GENL_CMD)) expect(cmds.get(`NBD_CMD_${k}`), k).toBe(v);
    expect(enumValues(header, 'NBD_SOCK_ITEM_UNSPEC').get('NBD_SOCK_ITEM')).toBe(K.NBD_SOCK_ITEM);
    expect(enumValues(header, 'NBD_SOCK_UNSPEC').get('NBD_SOCK_FD')).toBe(K.NBD_SOCK_FD);
    expect(enumValues(header, 'NBD_DEVICE_ITEM_UNSPEC').get('NBD_DEVICE_ITEM')).toBe(K.NBD_DEVICE_ITEM);
    const dev = enumValues(header, 'NBD_DEVICE_UNSPEC');
    expect([dev.get('NBD_DEVICE_INDEX'), dev.get('NBD_DEVICE_CONNECTED')]).toEqual([K.NBD_DEVICE.INDEX, K.NBD_DEVICE.CONNECTED]);
  });

  it('nlctrl ids from linux/genetlink.h', () => {
    const g = '/usr/include/linux/genetlink.h';
    const ctrlCmd = enumValues(g, 'CTRL_CMD_UNSPEC');
    expect([ctrlCmd.get('CTRL_CMD_NEWFAMILY'), ctrlCmd.get('CTRL_CMD_GETFAMILY')]).toEqual([K.CTRL_CMD.NEWFAMILY, K.CTRL_CMD.GETFAMILY]);
    const ctrlAttr = enumValues(g, 'CTRL_ATTR_UNSPEC');
    expect([ctrlAttr.get('CTRL_ATTR_FAMILY_ID'), ctrlAttr.get('CTRL_ATTR_FAMILY_NAME'), ctrlAttr.get('CTRL_ATTR_MCAST_GROUPS')]).toEqual([
      K.CTRL_ATTR.FAMILY_ID,
      K.CTRL_ATTR.FAMILY_NAME,
      K.CTRL_ATTR.MCAST_GROUPS,
    ]);
    expect(readFileSync(g, 'utf8')).toMatch(new RegExp(`#define GENL_ID_CTRL\\s+NLMSG_MIN_TYPE`));
    expect(readFileSync('/usr/include/linux/netlink.h', 'utf8')).toMatch(/#define NLMSG_MIN_TYPE\s+0x10/);
  });
});
