/** ublk devices for `nbdd list` / `nbdd detach`: GET_DEV_INFO for every /sys/class/ublk-char entry, with the state files. */
import { existsSync } from 'node:fs';
import type { DeviceReport } from '../kernel/inventory.js';
import { listStates, processAlive } from '../kernel/registry.js';
import { findDeviceInfo } from './control.js';
import { ublkIds, ublkSizeBytes } from './frontend.js';
import { UBLK_STATE, UBLK_STATE_NAME, ublkDevicePath } from './uapi.js';

export async function ublkInventory(): Promise<{ available: boolean; devices: DeviceReport[] }> {
  if (!existsSync('/dev/ublk-control')) return { available: false, devices: [] };
  const states = new Map(listStates('ublk').map((s) => [s.index, s]));
  const devices: DeviceReport[] = [];
  for (const id of ublkIds()) {
    const info = await findDeviceInfo(id).catch(() => undefined);
    if (!info) continue;
    const ours = states.get(id);
    const alive = info.ublksrvPid > 0 && processAlive(info.ublksrvPid) && (!ours || ours.pid === info.ublksrvPid);
    const state =
      info.state === UBLK_STATE.LIVE && alive ? 'connected' : info.state === UBLK_STATE.DEAD && !ours ? 'idle' : 'daemon-dead';
    devices.push({
      driver: 'ublk',
      device: ublkDevicePath(id),
      index: id,
      state,
      sizeBytes: ublkSizeBytes(id),
      backend: ours?.backendId ?? null,
      name: ours?.name ?? null,
      image: ours?.image ?? null,
      format: ours?.format ?? null,
      daemonPid: alive ? info.ublksrvPid : null,
      connections: null,
      readOnly: ours?.readOnly ?? false,
      timeoutS: null,
      deadConnTimeoutS: null,
      sidecar: alive ? (ours?.sidecar ?? null) : null,
      queues: info.nrHwQueues,
      depth: info.queueDepth,
      kernelState: UBLK_STATE_NAME[info.state] ?? String(info.state),
    });
  }
  return { available: true, devices };
}
