// Why this file exists: crash recovery. When an agent starts, every migration its journal shows
// unfinished is brought to a safe end, by a `switch` over the journaled phase (one commented case
// each; the compiler checks it is exhaustive). The rule: the VM runs on exactly one host, and a
// host resumes a paused guest only when the other side has said it will never run it.
import type { MigrationRow } from '../state/db.js';
import type { QemuInstance } from '../qemu/instance.js';
import { cont, migrationBitmaps, bitmapRemove, exportDel, nbdServerStop, runState } from '../qemu/migration-ops.js';
import type { VmSpec } from '../vm/spec.js';
import type { DestPhase, Journal, SourcePhase } from './journal.js';
import { askDestination, rollbackSource, type SourceHost } from './source.js';

export interface RecoverHost {
  journal: Journal;
  dial: SourceHost['dial'];
  /** the VM's live QEMU, if it still runs here */
  vm(name: string): { spec: VmSpec; inst: QemuInstance } | undefined;
  migratedAway(name: string, to: string): Promise<void>;
  activate(name: string, from: string): void;
  /** the source VM runs again (rolled back): record it */
  resumed(name: string): void;
  discard(name: string, uuid: string): Promise<void>;
  log(m: string): void;
}

function never(x: never): never {
  throw new Error(`unhandled migration phase ${String(x)}`);
}

/** Source side. Runs in the background for `switchover` (it may wait for the destination). */
export async function recoverSource(h: RecoverHost, r: MigrationRow): Promise<void> {
  const phase = r.phase as SourcePhase;
  const data = r.data as { to: string; url: string };
  const end = (p: SourcePhase, error?: string) => h.journal.source(r.id, r.vm, r.peer, p, { ...data, ...(error ? { error } : {}) });
  const vm = h.vm(r.vm);
  switch (phase) {
    // Before the switchover the guest never stopped here: undo our traces (QEMU's migration to
    // the dead agent's socket, bitmaps, exports, throttle) and keep it running. The destination
    // aborts when it is asked (or when its session times out).
    case 'begin':
    case 'prepare':
    case 'disk':
    case 'ram':
    case 'rollback':
      if (vm) {
        await cleanSource(vm.inst, vm.spec);
        h.resumed(r.vm);
      }
      end('failed', `agent restarted during the ${phase} phase; migration rolled back, the VM runs here`);
      // Tell the destination (one try): asking from a new session makes it abort and clean up.
      if (phase !== 'begin') await askDestination(h, data.url, r.id, () => {}, 1).catch(() => {});
      return;
    // The guest was paused for the switchover: only the destination knows whether it took over.
    // Ask until it answers; meanwhile the VM stays paused here.
    case 'switchover': {
      const verdict = await askDestination(h, data.url, r.id, (m) => h.log(`migration ${r.id.slice(0, 8)}: ${m}`));
      if (verdict === 'running') {
        h.journal.source(r.id, r.vm, r.peer, 'confirm', data);
        await h.migratedAway(r.vm, data.to).catch(() => {});
        end('done');
      } else {
        if (vm) {
          await cleanSource(vm.inst, vm.spec);
          h.resumed(r.vm);
        }
        end('failed', 'agent restarted at the switchover; the destination did not take over, so the VM resumed here');
      }
      return;
    }
    // The destination runs the VM: finish removing the source copy, and confirm to it.
    case 'confirm':
      await h.migratedAway(r.vm, data.to).catch(() => {});
      await askDestination(h, data.url, r.id, () => {}, 3).catch(() => {});
      end('done');
      return;
    case 'done':
    case 'failed':
    case 'cancelled':
      return;
    default:
      never(phase);
  }
}

/** Destination side. */
export async function recoverDest(h: RecoverHost, r: MigrationRow): Promise<void> {
  const phase = r.phase as DestPhase;
  const uuid = (r.data as { uuid?: string }).uuid;
  switch (phase) {
    // Before `running` the guest never ran here: kill the incoming QEMU, keep the partial disks
    // for a retry. The source rolls back when it learns (it asks, or its session times out).
    case 'prepare':
    case 'receiving':
    case 'finishing':
      if (uuid) await h.discard(r.vm, uuid).catch(() => {});
      h.journal.dest(r.id, r.vm, r.peer, 'aborted', { ...r.data, error: `agent restarted during ${phase}` });
      return;
    // `running` is journaled just before `cont`: make sure the guest runs, and is recorded so.
    case 'running': {
      const vm = h.vm(r.vm);
      if (vm) {
        if ((await runState(vm.inst.qmp).catch(() => '')) !== 'running') await cont(vm.inst.qmp).catch(() => {});
        h.activate(r.vm, r.peer);
      }
      return;
    }
    case 'done':
    case 'aborted':
      return;
    default:
      never(phase);
  }
}

/** Removes every trace of a migration from a source QEMU and resumes the guest if paused. */
export async function cleanSource(inst: QemuInstance, spec: VmSpec): Promise<void> {
  const qmp = inst.qmp;
  await rollbackSource(qmp, spec);
  for (let i = 0; i < spec.disks.length; i++) await exportDel(qmp, `fm-disk${i}`);
  await nbdServerStop(qmp);
  for (const b of await migrationBitmaps(qmp).catch(() => [])) await bitmapRemove(qmp, b.node, b.name);
  if ((await runState(qmp).catch(() => '')) !== 'running') await cont(qmp).catch(() => {});
}
