// Why this file exists: QEMU's own storage + RAM migration, driven exactly as libvirt drives it
// (../shared/reference/qemu-7.2.md): the yardstick Ferry is measured against. QMP sequences only;
// the agent decides when to call them and owns the processes.
//
//   destination: -incoming defer; nbd-server-start; block-export-add (writable) per disk;
//                migrate-set-capabilities/parameters; migrate-incoming tcp:H:P
//   source:      blockdev-add nbd per disk; blockdev-mirror (full, or top for an overlay whose
//                backing template the destination has); wait BLOCK_JOB_READY for all;
//                capabilities (+pause-before-switchover, events); migrate tcp:H:P;
//                at pre-switchover: block-job-cancel every READY mirror (completes them
//                consistently), migrate-continue; wait completed
//   destination: MIGRATION completed; nbd-server-stop; cont
import { FerryError } from '../errors.js';
import { sleep } from '../util/wait.js';
import type { QmpClient, QmpEvent } from './qmp.js';

export interface NativeTuning {
  /** extra migration capabilities, e.g. multifd, auto-converge, xbzrle */
  capabilities: string[];
  /** migrate-set-parameters fields, e.g. {"multifd-channels": 4, "multifd-compression": "zstd"} */
  parameters: Record<string, unknown>;
  /** mirror granularity in bytes (QEMU default: the cluster size, 64 KiB) */
  granularity?: number;
  /**
   * libvirt's `virsh migrate --timeout N`: if the migration has not converged after N seconds,
   * suspend the guest so it does (the guest stays paused until it resumes on the destination).
   * Without it, a guest writing more often than once per RTT keeps the mirror from ever
   * becoming READY.
   */
  suspendAfterSec?: number;
}

export interface IncomingDisk {
  node: string;
  exportName: string;
}

export async function setCapabilities(qmp: QmpClient, tuning: NativeTuning): Promise<void> {
  const caps = new Set(['pause-before-switchover', 'events', ...tuning.capabilities]);
  await qmp.execute('migrate-set-capabilities', { capabilities: [...caps].map((c) => ({ capability: c, state: true })) });
  if (Object.keys(tuning.parameters).length) await qmp.execute('migrate-set-parameters', tuning.parameters);
}

/** Destination, QEMU started with -incoming defer: export the disks, listen for RAM. */
export async function prepareIncoming(qmp: QmpClient, o: { host: string; nbdPort: number; migratePort: number; disks: IncomingDisk[]; tuning: NativeTuning }): Promise<void> {
  await qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: o.host, port: String(o.nbdPort) } } });
  for (const d of o.disks) {
    await qmp.execute('block-export-add', { type: 'nbd', id: `exp-${d.node}`, 'node-name': d.node, name: d.exportName, writable: true });
  }
  await setCapabilities(qmp, o.tuning);
  await qmp.execute('migrate-incoming', { uri: `tcp:${o.host}:${o.migratePort}` });
}

export interface MirrorPlan {
  node: string;
  exportName: string;
  /** 'top' when the destination already has the backing template */
  sync: 'full' | 'top';
}

export interface NativeProgress {
  phase: 'mirror' | 'ram' | 'switchover' | 'completed';
  mirrorDone: number;
  mirrorTotal: number;
  ram?: { transferred: number; remaining: number; total: number; dirtyRate?: number; throttle?: number };
}

export interface NativeResult {
  /** QEMU's own downtime figure (ms), from query-migrate; absent when QEMU did not report one. */
  qemuDowntimeMs?: number;
  mirrorReadyMs: number;
  totalMs: number;
  ramTransferredBytes: number;
  /** guest paused by QEMU at pre-switchover (ms since start) */
  pausedAtMs: number;
  /** when libvirt-style --timeout suspended the guest (ms since start), if it did */
  suspendedAtMs?: number;
}

async function jobs(qmp: QmpClient): Promise<{ device: string; offset: number; len: number; ready: boolean }[]> {
  return qmp.execute('query-block-jobs');
}

/**
 * Source: mirror every disk to the destination's NBD exports, then migrate RAM with
 * pause-before-switchover and complete the mirrors at the switchover. `beforeContinue` runs
 * while the guest is paused at pre-switchover (the caller records the guest's last durable
 * write there). Throws on failure; the caller decides about cleanup.
 */
export async function performNative(
  qmp: QmpClient,
  o: { host: string; nbdPort: number; migratePort: number; mirrors: MirrorPlan[]; tuning: NativeTuning; timeoutMs: number; onProgress?: (p: NativeProgress) => void; beforeContinue?: () => Promise<void> | void },
): Promise<NativeResult> {
  const t0 = Date.now();
  const deadline = t0 + o.timeoutMs;
  const remaining = () => {
    const ms = deadline - Date.now();
    if (ms <= 0) throw new FerryError('QMP_TIMEOUT', `native migration did not finish within ${o.timeoutMs} ms`);
    return ms;
  };
  const events: QmpEvent[] = [];
  const onEvent = (e: QmpEvent) => events.push(e);
  qmp.on('event', onEvent);
  try {
    for (const m of o.mirrors) {
      await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': `mirror-${m.node}`, server: { type: 'inet', host: o.host, port: String(o.nbdPort) }, export: m.exportName });
      await qmp.execute('blockdev-mirror', {
        'job-id': `mirror-${m.node}`,
        device: m.node,
        target: `mirror-${m.node}`,
        sync: m.sync,
        ...(o.tuning.granularity ? { granularity: o.tuning.granularity } : {}),
      });
    }
    // Wait until every mirror is READY (in sync, now mirroring new writes).
    let suspendedAtMs: number | undefined;
    const maybeSuspend = async () => {
      if (suspendedAtMs === undefined && o.tuning.suspendAfterSec !== undefined && Date.now() - t0 > o.tuning.suspendAfterSec * 1000) {
        suspendedAtMs = Date.now() - t0;
        // Stopping drains in-flight I/O, including the mirror's NBD writes still crossing a slow
        // link (up to its 16 MiB buffer): that can take minutes on a WAN, and libvirt waits.
        await qmp.execute('stop', undefined, Math.max(60_000, remaining()));
      }
    };
    for (;;) {
      await maybeSuspend();
      const js = await jobs(qmp);
      o.onProgress?.({ phase: 'mirror', mirrorDone: js.reduce((a, j) => a + j.offset, 0), mirrorTotal: js.reduce((a, j) => a + j.len, 0) });
      if (js.length === o.mirrors.length && js.every((j) => j.ready)) break;
      if (js.length < o.mirrors.length) throw new FerryError('QEMU_FAILED', `a mirror job ended early: ${JSON.stringify(events.filter((e) => e.event.startsWith('BLOCK_JOB')).slice(-3))}`);
      await sleep(Math.min(1000, remaining()));
    }
    const mirrorReadyMs = Date.now() - t0;
    await setCapabilities(qmp, o.tuning);
    await qmp.execute('migrate', { uri: `tcp:${o.host}:${o.migratePort}` });
    for (;;) {
      const st = await qmp.execute<{ status: string; ram?: { transferred: number; remaining: number; total: number; 'dirty-pages-rate'?: number }; 'cpu-throttle-percentage'?: number; 'error-desc'?: string }>('query-migrate');
      if (st.status === 'failed' || st.status === 'cancelled') throw new FerryError('QEMU_FAILED', `native migration ${st.status}: ${st['error-desc'] ?? ''}`);
      const js = await jobs(qmp);
      o.onProgress?.({
        phase: st.status === 'pre-switchover' ? 'switchover' : 'ram',
        mirrorDone: js.reduce((a, j) => a + j.offset, 0),
        mirrorTotal: js.reduce((a, j) => a + j.len, 0),
        ...(st.ram ? { ram: { transferred: st.ram.transferred, remaining: st.ram.remaining, total: st.ram.total, dirtyRate: st.ram['dirty-pages-rate'], throttle: st['cpu-throttle-percentage'] } } : {}),
      });
      if (st.status === 'pre-switchover') break;
      await maybeSuspend();
      await sleep(Math.min(500, remaining()));
    }
    const pausedAtMs = Date.now() - t0;
    await o.beforeContinue?.();
    // Complete the mirrors consistently: cancel on a READY job finishes it with source == target.
    for (const m of o.mirrors) await qmp.execute('block-job-cancel', { device: `mirror-${m.node}` });
    while ((await jobs(qmp)).length) await sleep(Math.min(50, remaining()));
    await qmp.execute('migrate-continue', { state: 'pre-switchover' });
    let final: { status: string; downtime?: number; ram?: { transferred: number }; 'error-desc'?: string };
    for (;;) {
      final = await qmp.execute('query-migrate');
      if (final.status === 'completed') break;
      if (final.status === 'failed' || final.status === 'cancelled') throw new FerryError('QEMU_FAILED', `native migration ${final.status} at switchover: ${final['error-desc'] ?? ''}`);
      await sleep(Math.min(50, remaining()));
    }
    o.onProgress?.({ phase: 'completed', mirrorDone: 0, mirrorTotal: 0 });
    return { ...(final.downtime === undefined ? {} : { qemuDowntimeMs: final.downtime }), ...(suspendedAtMs === undefined ? {} : { suspendedAtMs }), mirrorReadyMs, totalMs: Date.now() - t0, ramTransferredBytes: final.ram?.transferred ?? 0, pausedAtMs };
  } finally {
    qmp.off('event', onEvent);
  }
}

/** Destination: wait for the RAM stream to complete, stop the NBD server, add the bitmaps, resume. */
export async function finishIncoming(qmp: QmpClient, o: { timeoutMs: number; bitmapNodes: string[] }): Promise<void> {
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    const st = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (st.status === 'completed') break;
    if (st.status === 'failed') throw new FerryError('QEMU_FAILED', `incoming migration failed: ${st['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new FerryError('QMP_TIMEOUT', 'incoming migration did not complete in time');
    await sleep(50);
  }
  await qmp.execute('nbd-server-stop');
  // Integrity bookkeeping: everything the guest writes from now on is marked, so a later
  // comparison with the source's final disk can allow differences exactly there.
  for (const node of o.bitmapNodes) await qmp.execute('block-dirty-bitmap-add', { node, name: 'ferry-after-switchover', granularity: 4096 });
  await qmp.execute('cont');
}

