/** Every CLI command: each module exports `register(program)`; add one line per command. */
import type { Command } from 'commander';
import { register as create } from './create.js';
import { register as serve } from './serve.js';

export type RegisterCommand = (program: Command) => void;

export const commands: RegisterCommand[] = [serve, create];
