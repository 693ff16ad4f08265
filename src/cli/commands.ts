/** The list of CLI commands; each module adds its subcommand to the program. */
import type { Command } from 'commander';
import { register as create } from './create.js';

export type RegisterCommand = (program: Command) => void;

export const commands: RegisterCommand[] = [create];
