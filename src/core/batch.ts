/**
 * The batch: the requests one dispatch of the BlockQueue issues together — everything the
 * frontends submitted during one event-loop turn (see the contract in `backend.ts`).
 *
 * The queue runs each dispatch inside `runBatch`; every backend and layer call of the batch is
 * made synchronously inside it, in arrival order. Work a layer or backend wants to do once per
 * batch rather than once per request — persist the dirty bits of all first-touch writes with one
 * write and one sync, commit metadata once — is registered with `afterBatch`: it runs once the
 * batch's last request has been issued, before any of them can have completed (completions are
 * promise callbacks, which run only after the dispatch returns).
 *
 * Outside a batch (a control call, a test driving a backend directly) `afterBatch` runs its
 * callback in a microtask: still after every call made in the current synchronous stretch.
 */

let current: (() => void)[] | null = null;

/** Runs `issue` as one batch, then the callbacks registered during it, in registration order. */
export function runBatch(issue: () => void): void {
  if (current) {
    // A batch issued from inside another (a layer driving its own queue): one batch.
    issue();
    return;
  }
  const ends: (() => void)[] = [];
  current = ends;
  try {
    issue();
  } finally {
    current = null;
    for (let i = 0; i < ends.length; i++) ends[i]!();
  }
}

/** True while a batch is being issued. */
export function inBatch(): boolean {
  return current !== null;
}

/** Runs `fn` once the current batch has been issued (outside a batch: in a microtask). */
export function afterBatch(fn: () => void): void {
  if (current) current.push(fn);
  else queueMicrotask(fn);
}

/**
 * Completion-side work — what requests do after their first await (a data sync, L2 entry writes,
 * a commit, ublk results) — cannot join the batch that issued them. It is grouped per event-loop
 * turn instead: `turnEnd()` is one promise for everyone who asks during a turn, resolved once,
 * after that turn's I/O callbacks (`setImmediate`). A user keeps its own "pending" state and
 * joins the turn's group when it has work:
 *
 *   this.sync ??= turnEnd().then(() => { this.sync = null; return fsync(); });
 *
 * NBD reply bytes do not wait for it: the TurnWriter sends them in the iteration that completed
 * them (src/nbd/turn-writer.ts).
 */
let turn: Promise<void> | null = null;

export function turnEnd(): Promise<void> {
  turn ??= new Promise<void>((resolve) =>
    setImmediate(() => {
      turn = null;
      resolve();
    }),
  );
  return turn;
}
