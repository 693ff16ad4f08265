import { describe, expect, it } from 'vitest';
import {
  attrValue,
  decodeGenl,
  decodeMessages,
  decodeNlError,
  encodeAttrs,
  encodeGenlMessage,
  findAttr,
  nla,
  parseAttrs,
} from '../../src/netlink/codec.js';
import { CTRL_ATTR, GENL_ID_CTRL, NLMSG, NLM_F } from '../../src/netlink/constants.js';
import { decodeFamilyReply, getFamilyCommand } from '../../src/netlink/nlctrl.js';

/** Hex with spaces and newlines for readability. */
const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

describe('attributes', () => {
  it('encodes u8/u16/u32/u64/string with 4-byte padding', () => {
    const out = encodeAttrs([nla.u8(1, 0xab), nla.u16(2, 0x1234), nla.u32(3, 0xdeadbeef), nla.u64(4, 2 ** 40 + 5), nla.string(5, 'nbd')]);
    expect(out).toEqual(
      hex(`
      0500 0100 ab 000000
      0600 0200 3412 0000
      0800 0300 efbeadde
      0c00 0400 0500000000010000
      0800 0500 6e626400`),
    );
  });

  it('pads a string whose length with NUL is not a multiple of 4 and leaves nla_len unpadded', () => {
    expect(encodeAttrs([nla.string(10, 'abcd')])).toEqual(hex('0900 0a00 6162636400 000000'));
  });

  it('encodes nests with NLA_F_NESTED and the children (padding included) in the length', () => {
    const out = encodeAttrs([nla.nest(7, [nla.nest(1, [nla.u32(1, 5)]), nla.nest(1, [nla.u32(1, 6)])])]);
    expect(out).toEqual(hex('1c00 0780  0c00 0180 0800 0100 05000000  0c00 0180 0800 0100 06000000'));
  });

  it('rejects u64 values JavaScript cannot hold exactly and bad types', () => {
    expect(() => nla.u64(1, 2 ** 53)).toThrow(/out of range/);
    expect(() => nla.u64(1, -1)).toThrow(/out of range/);
    expect(() => encodeAttrs([nla.u32(0, 1)])).toThrow(/bad attribute type/);
  });

  it('parses back what it encodes, masking flag bits', () => {
    const buf = encodeAttrs([nla.u32(3, 77), nla.nest(9, [nla.string(1, 'x'), nla.u64(2, 12345)])]);
    const attrs = parseAttrs(buf);
    expect(attrs.map((a) => [a.type, a.nested])).toEqual([
      [3, false],
      [9, true],
    ]);
    expect(attrValue.u32(attrs[0]!)).toBe(77);
    const inner = attrValue.nest(attrs[1]!);
    expect(attrValue.string(inner[0]!)).toBe('x');
    expect(attrValue.u64(inner[1]!)).toBe(12345);
  });

  it('accepts a last attribute whose padding was cut off', () => {
    expect(attrValue.u8(parseAttrs(hex('0500 0100 07'))[0]!)).toBe(7);
  });

  it('throws EPROTO for every truncation that cuts into an attribute header or payload', () => {
    const buf = encodeAttrs([nla.u64(2, 1), nla.string(10, 'backend')]);
    const lastPadStart = 12 + 4 + 8; // second attribute: header 4 + "backend\0" 8 = 12 bytes, no padding
    for (let cut = 1; cut < buf.length; cut++) {
      if (cut === 12 || cut === lastPadStart) continue; // attribute boundaries are valid ends
      expect(() => parseAttrs(buf.subarray(0, cut)), `cut at ${cut}`).toThrow(expect.objectContaining({ code: 'EPROTO' }));
    }
  });

  it('rejects an attribute length below its header or too short for its type', () => {
    expect(() => parseAttrs(hex('0200 0100'))).toThrow(/attribute length 2/);
    expect(() => attrValue.u64(parseAttrs(hex('0800 0100 01000000'))[0]!)).toThrow(/u64 attribute 1 has 4 bytes/);
    expect(() => attrValue.u64(parseAttrs(hex('0c00 0100 0000000000002000'))[0]!)).toThrow(/too large/);
  });
});

describe('messages', () => {
  it('encodes the 28-byte nlctrl GETFAMILY request for "nbd" byte for byte', () => {
    const msg = encodeGenlMessage({ ...getFamilyCommand('nbd'), flags: NLM_F.REQUEST | NLM_F.ACK, seq: 1 });
    expect(msg).toEqual(
      hex(`
      1c000000 1000 0500 01000000 00000000
      03 01 0000
      0800 0200 6e626400`),
    );
  });

  it('splits a datagram into aligned messages and decodes the genl header', () => {
    const a = encodeGenlMessage({ family: 0x20, cmd: 5, version: 1, flags: 0, seq: 9, attrs: [nla.u8(2, 1)] });
    const b = encodeGenlMessage({ family: 0x21, cmd: 4, version: 1, flags: 0, seq: 10, attrs: [] });
    const msgs = decodeMessages(Buffer.concat([a, b]));
    expect(msgs.map((m) => [m.type, m.seq, m.payload.length])).toEqual([
      [0x20, 9, 12],
      [0x21, 10, 4],
    ]);
    const g = decodeGenl(msgs[0]!.payload);
    expect([g.cmd, g.version, attrValue.u8(g.attrs[0]!)]).toEqual([5, 1, 1]);
  });

  it('throws EPROTO on every truncated datagram and on a length below the header', () => {
    const msg = encodeGenlMessage({ family: 0x20, cmd: 1, version: 1, flags: 0, seq: 1, attrs: [nla.u32(1, 3)] });
    for (let cut = 1; cut < msg.length; cut++) {
      expect(() => decodeMessages(msg.subarray(0, cut)), `cut at ${cut}`).toThrow(expect.objectContaining({ code: 'EPROTO' }));
    }
    const bad = Buffer.from(msg);
    bad.writeUInt32LE(8, 0);
    expect(() => decodeMessages(bad)).toThrow(/message length 8/);
  });

  it('decodes an ACK, an error, and an error with extended-ack text', () => {
    // NLMSG_ERROR, capped: s32 error, then the 16-byte echoed request header.
    const ack = hex('24000000 0200 0001 07000000 00000000  00000000  1c000000 1000 0500 07000000 00000000');
    expect(decodeNlError(decodeMessages(ack)[0]!)).toEqual({ errno: 0, seq: 7 });
    const enoent = hex('24000000 0200 0001 08000000 00000000  feffffff  1c000000 1000 0500 08000000 00000000');
    expect(decodeNlError(decodeMessages(enoent)[0]!)).toEqual({ errno: 2, seq: 8 });
    // CAPPED | ACK_TLVS, NLMSGERR_ATTR_MSG "bad\0".
    const ext = hex('2c000000 0200 0003 09000000 00000000  eaffffff  1c000000 1000 0500 09000000 00000000  0800 0100 62616400');
    expect(decodeNlError(decodeMessages(ext)[0]!)).toEqual({ errno: 22, seq: 9, message: 'bad' });
  });
});

describe('nlctrl', () => {
  it('decodes a NEWFAMILY reply with its multicast groups', () => {
    const reply = encodeGenlMessage({
      family: GENL_ID_CTRL,
      cmd: 1,
      version: 2,
      flags: 0,
      seq: 3,
      attrs: [
        nla.string(CTRL_ATTR.FAMILY_NAME, 'nbd'),
        nla.u16(CTRL_ATTR.FAMILY_ID, 0x1d),
        nla.u32(3, 1), // CTRL_ATTR_VERSION: ignored
        nla.nest(CTRL_ATTR.MCAST_GROUPS, [nla.nest(1, [nla.u32(2, 0x0b), nla.string(1, 'nbd_mc_group')])]),
      ],
    });
    const [m] = decodeMessages(reply);
    expect(m!.type).not.toBe(NLMSG.ERROR);
    const fam = decodeFamilyReply(decodeGenl(m!.payload));
    expect(fam).toEqual({ name: 'nbd', id: 0x1d, groups: new Map([['nbd_mc_group', 0x0b]]) });
  });

  it('refuses a reply without the family id', () => {
    const g = decodeGenl(encodeGenlMessage({ family: GENL_ID_CTRL, cmd: 1, version: 2, flags: 0, seq: 1, attrs: [nla.string(2, 'nbd')] }).subarray(16));
    expect(findAttr(g.attrs, CTRL_ATTR.FAMILY_ID)).toBeUndefined();
    expect(() => decodeFamilyReply(g)).toThrow(/lacks the family id/);
  });
});
