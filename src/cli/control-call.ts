/** Shared by the control-socket commands (bitmap, status, events): one call, then close. */
import { ControlClient } from '../control/control-client.js';
import { RpcError } from '../control/jsonrpc.js';
import { Errno, NbddError } from '../core/errors.js';
import { controlSocketOf } from '../sidecar/locate.js';

/** Calls `method` on the sidecar of `target`; a JSON-RPC error becomes an NbddError. */
export async function controlCall<T = unknown>(target: string, method: string, params?: Record<string, unknown>): Promise<T> {
  const client = await ControlClient.connect(controlSocketOf(target));
  try {
    return await client.call<T>(method, params);
  } catch (err) {
    if (err instanceof RpcError) {
      const errnoName = (err.data as { errno?: string } | undefined)?.errno;
      const errno = errnoName && errnoName in Errno ? Errno[errnoName as keyof typeof Errno] : Errno.EINVAL;
      throw new NbddError(errno, err.message);
    }
    throw err;
  } finally {
    await client.close();
  }
}
