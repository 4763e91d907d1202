// Why this file exists: the agent's side of QEMU's *native* migration (libvirt-style NBD mirror
// + RAM pre-copy), which `ferry bench migrate` runs as the baseline Ferry must beat. The
// destination prepares (VM in state `incoming`, NBD exports, migrate-incoming) and later
// finishes (resume); the source runs the migration as a background job the caller polls.
// Ferry's own migration (phased, journaled, over Ferry's transport) is a separate module.
import { FerryError } from '../errors.js';
import { diskNodeName } from '../qemu/cmdline.js';
import { finishIncoming, performNative, prepareIncoming, type NativeProgress, type NativeResult, type NativeTuning } from '../qemu/native-migration.js';
import type { GuestStats } from '../qemu/serial.js';
import type { VmSpec } from '../vm/spec.js';
import { run } from '../util/exec.js';
import type { VmManager } from './vms.js';

export interface IncomingRequest {
  spec: VmSpec;
  from: string;
  listenHost: string;
  nbdPort: number;
  migratePort: number;
  tuning: NativeTuning;
}

export interface OutgoingRequest {
  host: string;
  nbdPort: number;
  migratePort: number;
  tuning: NativeTuning;
  timeoutMs: number;
  to: string;
}

export interface MigrationJob {
  vm: string;
  to: string;
  state: 'running' | 'completed' | 'failed';
  startedAt: number;
  progress: NativeProgress | null;
  result: NativeResult | null;
  error: string | null;
  /** source guest's probes when QEMU paused it for the switchover (its last durable write) */
  atSwitchover: GuestStats | null;
  /** source guest's probes at the end (largest gap during pre-copy, last heartbeat time) */
  final: GuestStats | null;
}

function checkTuning(t: unknown): NativeTuning {
  const o = (t ?? {}) as Partial<NativeTuning>;
  if (!Array.isArray(o.capabilities ?? []) || typeof (o.parameters ?? {}) !== 'object') throw new FerryError('INVALID_ARGUMENT', 'tuning: {capabilities: string[], parameters: object}');
  return {
    capabilities: (o.capabilities ?? []).map(String),
    parameters: o.parameters ?? {},
    ...(o.granularity ? { granularity: Number(o.granularity) } : {}),
    ...(o.suspendAfterSec !== undefined ? { suspendAfterSec: Number(o.suspendAfterSec) } : {}),
  };
}

export class NativeMigrations {
  private readonly jobs = new Map<string, MigrationJob>();

  constructor(private readonly vms: VmManager) {}

  async prepare(req: IncomingRequest): Promise<{ name: string; exports: string[] }> {
    const tuning = checkTuning(req.tuning);
    const { inst } = await this.vms.createIncoming(req.spec, String(req.from ?? 'unknown'));
    const disks = req.spec.disks.map((d, i) => ({ node: diskNodeName(i), exportName: d.id }));
    try {
      await prepareIncoming(inst.qmp, { host: req.listenHost, nbdPort: req.nbdPort, migratePort: req.migratePort, disks, tuning });
    } catch (e) {
      await this.vms.delete(req.spec.name, { force: true });
      throw e;
    }
    return { name: req.spec.name, exports: disks.map((d) => d.exportName) };
  }

  /**
   * Arms the destination: in the background, wait for the RAM stream to complete, then resume
   * at once (no client round trip in the guest's pause). Poll GET /v1/vms/:name/migration.
   */
  finish(name: string, timeoutMs = 3_600_000): MigrationJob {
    const { rec, inst } = this.vms.running(name);
    if (rec.runtime.state !== 'incoming') throw new FerryError('VM_NOT_RUNNING', `VM "${name}" is ${rec.runtime.state}, not an incoming migration`);
    const from = rec.runtime.from ?? 'unknown';
    const job: MigrationJob = { vm: name, to: 'here', state: 'running', startedAt: Date.now(), progress: null, result: null, error: null, atSwitchover: null, final: null };
    this.jobs.set(name, job);
    inst.serial.resetGap();
    void finishIncoming(inst.qmp, { timeoutMs, bitmapNodes: rec.spec.disks.map((_, i) => diskNodeName(i)) })
      .then(() => {
        job.state = 'completed';
        this.vms.setRuntime(name, { state: 'running', pid: inst.pid, startedAt: Date.now() }, { kind: 'migrated-in', message: `native migration from ${from} completed; running here` });
      })
      .catch((e) => {
        job.state = 'failed';
        job.error = (e as Error).message;
      });
    return job;
  }

  /**
   * Destination, after a migration: pauses the VM and returns, per disk, the 4 KiB-granular
   * extents the guest wrote since the switchover (bitmap `ferry-after-switchover`), read over a
   * read-only NBD export with nbdinfo. Differences from the source's final disk are allowed
   * exactly there. The VM is left paused; the caller stops it.
   */
  async dirtySinceSwitchover(name: string): Promise<Record<string, { offset: number; length: number }[]>> {
    const { rec, inst } = this.vms.running(name);
    const sock = `${this.vms.paths(rec.spec).qmpSocket}.nbd`;
    await inst.pause();
    await inst.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    const out: Record<string, { offset: number; length: number }[]> = {};
    try {
      for (const [i, d] of rec.spec.disks.entries()) {
        const node = diskNodeName(i);
        await inst.qmp.execute('block-dirty-bitmap-disable', { node, name: 'ferry-after-switchover' });
        await inst.qmp.execute('block-export-add', { type: 'nbd', id: `chk-${node}`, 'node-name': node, name: d.id, writable: false, bitmaps: ['ferry-after-switchover'] });
        const r = await run('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:ferry-after-switchover', `nbd+unix:///${d.id}?socket=${sock}`]);
        const map = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
        out[d.id] = map.filter((e) => (e.type & 1) === 1).map((e) => ({ offset: e.offset, length: e.length }));
        await inst.qmp.execute('block-export-del', { id: `chk-${node}` });
      }
    } finally {
      await inst.qmp.execute('nbd-server-stop').catch(() => {});
    }
    return out;
  }

  start(name: string, req: OutgoingRequest): MigrationJob {
    const tuning = checkTuning(req.tuning);
    const { rec, inst } = this.vms.running(name);
    if (rec.runtime.state !== 'running') throw new FerryError('VM_NOT_RUNNING', `VM "${name}" is ${rec.runtime.state}, not running`);
    const existing = this.jobs.get(name);
    if (existing?.state === 'running') throw new FerryError('VM_BUSY', `VM "${name}" is already migrating`);
    const job: MigrationJob = { vm: name, to: req.to, state: 'running', startedAt: Date.now(), progress: null, result: null, error: null, atSwitchover: null, final: null };
    this.jobs.set(name, job);
    inst.serial.resetGap();
    const mirrors = rec.spec.disks.map((d, i) => ({ node: diskNodeName(i), exportName: d.id, sync: d.backing ? ('top' as const) : ('full' as const) }));
    void this.vms
      .exclusive(name, async () => {
        this.vms.setRuntime(name, rec.runtime, { kind: 'migrating', message: `native migration to ${req.to}` });
        try {
          job.result = await performNative(inst.qmp, {
            host: req.host,
            nbdPort: req.nbdPort,
            migratePort: req.migratePort,
            mirrors,
            tuning,
            timeoutMs: req.timeoutMs,
            onProgress: (p) => (job.progress = p),
            beforeContinue: () => {
              job.atSwitchover = { ...inst.serial.stats };
            },
          });
          job.final = { ...inst.serial.stats };
          job.state = 'completed';
          await inst.quit();
          this.vms.setRuntime(name, { state: 'stopped', reason: `migrated to ${req.to}` }, { kind: 'migrated-out', message: `native migration to ${req.to} completed in ${job.result.totalMs} ms` });
        } catch (e) {
          job.error = (e as Error).message;
          job.final = { ...inst.serial.stats };
          job.state = 'failed';
          // Leave the VM running here: abort what is in flight (best effort, each step may fail).
          await inst.qmp.execute('migrate_cancel').catch(() => {});
          for (const m of mirrors) await inst.qmp.execute('block-job-cancel', { device: `mirror-${m.node}`, force: true }).catch(() => {});
          await new Promise((r) => setTimeout(r, 500));
          for (const m of mirrors) await inst.qmp.execute('blockdev-del', { 'node-name': `mirror-${m.node}` }).catch(() => {});
          const st = await inst.status().catch(() => null);
          if (st && !st.running) await inst.resume().catch(() => {});
          this.vms.setRuntime(name, rec.runtime, { kind: 'migration-failed', message: job.error });
        }
      })
      .catch((e) => {
        job.state = 'failed';
        job.error = (e as Error).message;
      });
    return job;
  }

  status(name: string): MigrationJob {
    const j = this.jobs.get(name);
    if (!j) throw new FerryError('VM_NOT_FOUND', `no migration of VM "${name}" on this host`);
    return j;
  }
}
