/**
 * The device runtime: one image served by one frontend, with its sidecar. Every way nbdd serves
 * an image (`nbdd serve`, kernel NBD attach, ublk) is a Frontend started here, so they all share
 * one start and one stop order:
 *
 *   start: stack (image, bitmaps, layers, queue) → sidecar → metrics → frontend
 *   stop:  metrics → frontend (answers what is in flight, takes no more) → sidecar (ends a backup) → stack
 *          (the queue drains and flushes, bitmaps are stored, the image closes — last)
 *
 * A failure while starting undoes what was started, in the same reverse order.
 */
import { logger } from '../core/log.js';
import { messageOf } from '../core/errors.js';
import type { EventType } from '../control/events.js';
import { Sidecar } from '../sidecar/sidecar.js';
import { deviceRegistry, MetricsServer, type MetricsListen } from './metrics.js';
import { remoteLinkOf } from '../backends/remote.js';
import { openStack, type DeviceStack, type StackOptions } from './stack.js';

const log = logger('runtime');

export interface FrontendContext {
  readonly stack: DeviceStack;
  /** The sidecar's directory, when there is one. */
  readonly sidecarDir: string | null;
  /** Publishes to the sidecar's event subscribers (nothing without a sidecar). */
  publish(type: EventType, data?: Record<string, unknown>): void;
  /** The frontend ended on its own (device disconnected from outside, `--run` finished). */
  ended(): void;
}

export interface Frontend {
  /** e.g. 'nbd-server', 'kernel-nbd', 'ublk'. */
  readonly kind: string;
  /** Starts serving `ctx.stack.queue`. On failure it leaves nothing of its own open. */
  start(ctx: FrontendContext): Promise<void>;
  /** Stops taking requests and answers those in flight; never closes the queue. Idempotent. */
  stop(): Promise<void>;
  /** Merged into the sidecar's `status` (device path, connections, ...). */
  status(): Record<string, unknown>;
}

export interface RuntimeOptions {
  image: string;
  stack?: StackOptions;
  frontend: Frontend;
  /** Start the sidecar under this name (in `dir`, default `$NBDD_RUN_DIR/NAME`); none when absent. */
  sidecar?: { name: string; dir?: string };
  /** Serve Prometheus metrics labelled `device="NAME"` here (see metrics.ts); none when absent. */
  metrics?: { listen: MetricsListen; name: string };
}

export class DeviceRuntime {
  private stopping: Promise<void> | null = null;
  private readonly events = new Map<EventType, number>();
  private metricsServer: MetricsServer | null = null;
  private doneResolve!: () => void;
  /** Resolves once the runtime has stopped (by `stop()` or because the frontend ended). */
  readonly done: Promise<void> = new Promise((r) => (this.doneResolve = r));

  private constructor(
    readonly stack: DeviceStack,
    readonly frontend: Frontend,
    readonly sidecar: Sidecar | null,
  ) {}

  static async start(options: RuntimeOptions): Promise<DeviceRuntime> {
    const stack = await openStack(options.image, options.stack);
    const { frontend } = options;
    let sidecar: Sidecar | null = null;
    let metrics: MetricsServer | null = null;
    try {
      if (options.sidecar) {
        sidecar = await Sidecar.start({ ...options.sidecar, stack, frontendStatus: () => frontend.status() });
      }
      const runtime = new DeviceRuntime(stack, frontend, sidecar);
      // A remote backend's (or remote backing file's) losses and returns are device events too.
      remoteLinkOf(stack.image)?.onRemoteEvent((type, data) => {
          runtime.events.set(type, runtime.eventCount(type) + 1);
          runtime.sidecar?.events.publish(type, data);
      });
      if (options.metrics) {
        metrics = runtime.metricsServer = await MetricsServer.start(options.metrics.listen, await deviceRegistry(runtime, options.metrics.name));
        log.info(`metrics at ${metrics.url}`);
      }
      let started = false;
      let endedEarly = false;
      await frontend.start({
        stack,
        sidecarDir: sidecar?.dir ?? null,
        publish: (type, data) => {
          runtime.events.set(type, runtime.eventCount(type) + 1);
          runtime.sidecar?.events.publish(type, data);
        },
        ended: () => {
          if (started) void runtime.stop();
          else endedEarly = true;
        },
      });
      started = true;
      if (endedEarly) void runtime.stop();
      return runtime;
    } catch (err) {
      await metrics?.close();
      await sidecar?.close().catch((e: unknown) => log.warn(`closing the sidecar: ${messageOf(e)}`));
      await stack.close().catch((e: unknown) => log.warn(`closing ${options.image}: ${messageOf(e)}`));
      throw err;
    }
  }

  /** Events the frontend published so far (counted whether or not anyone subscribed). */
  eventCount(type: EventType): number {
    return this.events.get(type) ?? 0;
  }

  /** Where the metrics are served, when they are. */
  get metricsUrl(): string | null {
    return this.metricsServer?.url ?? null;
  }

  /** Stops in the order above Idempotent; resolves when the image is closed. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      try {
        await this.step('closing the metrics endpoint', async () => this.metricsServer?.close());
        await this.step('stopping the frontend', () => this.frontend.stop());
        await this.step('closing the sidecar', async () => this.sidecar?.close());
        await this.stack.close();
      } finally {
        this.doneResolve();
      }
    })();
    return this.stopping;
  }

  /** Runs one stop step; its failure is logged, and the later steps still run. */
  private async step(what: string, run: () => Promise<unknown>): Promise<void> {
    try {
      await run();
    } catch (err) {
      log.error(`${what}: ${messageOf(err)}`);
    }
  }
}
