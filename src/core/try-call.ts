/**
 * Calls `f` and returns its promise; a synchronous throw (a contract check, a failed inline system
 * call) becomes a rejection. On the per-request path this replaces an async wrapper, which would
 * cost a promise and a microtask more per call.
 */
export function tryCall<T>(f: () => T | Promise<T>): Promise<T> {
  try {
    return Promise.resolve(f());
  } catch (err) {
    return Promise.reject(err);
  }
}
