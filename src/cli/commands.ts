/** Every CLI command: each module exports `register(program)`; add one line per command. */
import type { Command } from 'commander';
import { register as attach } from './attach.js';
import { register as backup } from './backup.js';
import { register as bitmap } from './bitmap.js';
import { register as check } from './check.js';
import { register as create } from './create.js';
import { register as detach } from './detach.js';
import { register as events } from './events.js';
import { register as info } from './info.js';
import { register as installSystemd } from './install-systemd.js';
import { register as installUdev } from './install-udev.js';
import { register as list } from './list.js';
import { register as map } from './map.js';
import { register as serve } from './serve.js';
import { register as status } from './status.js';

export type RegisterCommand = (program: Command) => void;

export const commands: RegisterCommand[] = [serve, attach, detach, list, create, installUdev, installSystemd, info, check, map, status, bitmap, events, backup];
