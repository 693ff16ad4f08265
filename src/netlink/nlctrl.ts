/**
 * The generic-netlink controller ("nlctrl"): resolving a family name to its dynamic id and
 * multicast groups. Pure encode/decode; the socket layer sends and receives.
 */
import { Errno, NbddError } from '../core/errors.js';
import { attrValue, findAttr, nla, type GenlMessage, type NlAttr } from './codec.js';
import { CTRL_ATTR, CTRL_ATTR_MCAST_GRP, CTRL_CMD, GENL_ID_CTRL } from './constants.js';

/** A family request without header fields: what to send to which family. */
export interface GenlCommand {
  family: number;
  cmd: number;
  version: number;
  attrs: NlAttr[];
}

/** CTRL_CMD_GETFAMILY { CTRL_ATTR_FAMILY_NAME "name\0" } to nlctrl (id 0x10), version 1. */
export function getFamilyCommand(name: string): GenlCommand {
  return { family: GENL_ID_CTRL, cmd: CTRL_CMD.GETFAMILY, version: 1, attrs: [nla.string(CTRL_ATTR.FAMILY_NAME, name)] };
}

export interface FamilyInfo {
  name: string;
  id: number;
  /** Multicast group name → group id. */
  groups: Map<string, number>;
}

/**
 * Decodes the CTRL_CMD_NEWFAMILY reply: CTRL_ATTR_FAMILY_ID (u16), CTRL_ATTR_FAMILY_NAME, and
 * CTRL_ATTR_MCAST_GROUPS = nest of entries (types 1..n), each a nest holding
 * CTRL_ATTR_MCAST_GRP_NAME (string) and CTRL_ATTR_MCAST_GRP_ID (u32) in any order.
 */
export function decodeFamilyReply(msg: GenlMessage): FamilyInfo {
  if (msg.cmd !== CTRL_CMD.NEWFAMILY) throw new NbddError(Errno.EPROTO, `nlctrl: unexpected reply command ${msg.cmd}`);
  const id = findAttr(msg.attrs, CTRL_ATTR.FAMILY_ID);
  const name = findAttr(msg.attrs, CTRL_ATTR.FAMILY_NAME);
  if (!id || !name) throw new NbddError(Errno.EPROTO, 'nlctrl: reply lacks the family id or name');
  const groups = new Map<string, number>();
  const mcast = findAttr(msg.attrs, CTRL_ATTR.MCAST_GROUPS);
  for (const entry of mcast ? attrValue.nest(mcast) : []) {
    const fields = attrValue.nest(entry);
    const grpName = findAttr(fields, CTRL_ATTR_MCAST_GRP.NAME);
    const grpId = findAttr(fields, CTRL_ATTR_MCAST_GRP.ID);
    if (grpName && grpId) groups.set(attrValue.string(grpName), attrValue.u32(grpId));
  }
  return { name: attrValue.string(name), id: attrValue.u16(id), groups };
}
