/** Shared by the control-socket commands (bitmap, status, events): one call, then close. */
import { callOn, ControlClient } from '../control/control-client.js';
import { controlSocketOf } from '../sidecar/locate.js';

/** Calls `method` on the sidecar of `target`; a JSON-RPC error becomes an NbddError. */
export async function controlCall<T = unknown>(target: string, method: string, params?: Record<string, unknown>): Promise<T> {
  const client = await ControlClient.connect(controlSocketOf(target));
  try {
    return await callOn<T>(client, method, params);
  } finally {
    await client.close();
  }
}
