/**
 * The events of one device that the control socket streams (`events.subscribe`): dirty extents
 * as they happen, the kernel link going dead and coming back, errors. Producers (frontends,
 * layers, the sidecar) call `publish`; subscribers get plain JSON-ready objects.
 */
import { EventEmitter } from 'node:events';

export const EVENT_TYPES = ['dirty', 'link-dead', 'reconnected', 'error', 'backup-error', 'remote-lost', 'remote-reconnected'] as const;
export type EventType = (typeof EVENT_TYPES)[number];

export interface DeviceEvent {
  type: EventType;
  /** ISO 8601 time of the event. */
  time: string;
  [key: string]: unknown;
}

export class DeviceEvents {
  private readonly emitter = new EventEmitter();

  constructor() {
    this.emitter.setMaxListeners(0);
  }

  /** Whether anyone listens for `type` (producers skip building events nobody wants). */
  wanted(type: EventType): boolean {
    return this.emitter.listenerCount(type) > 0;
  }

  publish(type: EventType, data: Record<string, unknown> = {}): void {
    if (!this.wanted(type)) return;
    this.emitter.emit(type, { type, time: new Date().toISOString(), ...data } satisfies DeviceEvent);
  }

  /** Listens to `types`; returns the unsubscribe function. */
  subscribe(types: readonly EventType[], listener: (e: DeviceEvent) => void): () => void {
    for (const t of types) this.emitter.on(t, listener);
    return () => {
      for (const t of types) this.emitter.off(t, listener);
    };
  }
}

/**
 * Gathers dirty ranges and hands them over once per event-loop turn, sorted and merged, so a
 * batch of writes becomes one `dirty` event instead of one per write.
 */
export class DirtyCoalescer {
  private ranges: [number, number][] = [];
  private scheduled = false;

  constructor(private readonly flush: (extents: [offset: number, length: number][]) => void) {}

  add(offset: number, length: number): void {
    this.ranges.push([offset, length]);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      const ranges = this.ranges.sort((a, b) => a[0] - b[0]);
      this.ranges = [];
      const merged: [number, number][] = [];
      for (const [o, l] of ranges) {
        const last = merged[merged.length - 1];
        if (last && o <= last[0] + last[1]) last[1] = Math.max(last[1], o + l - last[0]);
        else merged.push([o, l]);
      }
      this.flush(merged);
    });
  }
}
