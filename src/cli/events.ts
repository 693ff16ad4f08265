/** `nbdd events DEVICE|NAME`: print the device's events, one JSON object per line, until stopped. */
import type { Command } from 'commander';
import { ControlClient } from '../control/control-client.js';
import { controlSocketOf } from '../sidecar/locate.js';

export function register(program: Command): void {
  program
    .command('events')
    .description('stream events (dirty extents, link dead/reconnected, errors) as JSON lines')
    .argument('<device>', 'device or export NAME, or its sidecar directory')
    .option('-t, --type <types...>', 'only these types (dirty, link-dead, reconnected, error, backup-error)')
    .action(async (device: string, o: { type?: string[] }) => {
      const client = await ControlClient.connect(controlSocketOf(device));
      client.onNotification = (method, params) => {
        if (method === 'event' || method === 'events.lost') process.stdout.write(`${JSON.stringify(method === 'event' ? params : { type: 'lost', ...(params as object) })}\n`);
      };
      await client.call('events.subscribe', o.type ? { types: o.type } : {});
      const stop = (): void => void client.close();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      await client.closed;
    });
}
