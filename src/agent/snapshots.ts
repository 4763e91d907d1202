// Why this file exists: external snapshots of a VM, as a tree. Taking snapshot S freezes each
// disk's current image (it becomes S's read-only point in time) and moves the VM onto a new
// overlay backed by it — live, in one QMP transaction across disks. With --memory, RAM and device
// state are saved too, with the guest paused while they are written (see snapshot-ops.ts for why).
//
//   template ← [S1 images] ← [S2 images] ← active overlays (the VM now; current = S2)
//                        ↖ [S3 images]  (a branch: S3 was taken after reverting to S1)
//
// revert S: the VM (stopped first if it runs) gets fresh overlays on S's images; with memory it
//   resumes exactly where S was taken. The state it left, if no snapshot holds it, is discarded.
// delete S: S's data is merged into every image backed by it (live `block-stream` for images the
//   running VM reads, `qemu-img rebase` otherwise), then S's images go. Children move up to S's
//   parent.
// Crash safety: the new definition (overlays) is committed to the database before QEMU switches
// to them. An empty overlay over the old image reads exactly like it, so if the agent dies in
// between, nothing is lost; recovery finishes or undoes the snapshot by what QEMU runs on.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { FerryError } from '../errors.js';
import { liveSnapshot, nodeOfFile, saveState, streamInto, topNodes } from '../qemu/snapshot-ops.js';
import type { SnapshotRow, StateDb } from '../state/db.js';
import * as qcow2 from '../storage/qcow2.js';
import type { VmSpec } from '../vm/spec.js';
import { isActive } from '../vm/spec.js';
import type { VmManager } from './vms.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export interface SnapshotView {
  name: string;
  parent: string | null;
  createdAt: number;
  memory: boolean;
  current: boolean;
  children: string[];
}

export class Snapshots {
  constructor(private readonly vms: VmManager, private readonly db: StateDb) {}

  private abs(spec: VmSpec, file: string): string {
    return file.startsWith('/') ? file : path.join(this.vms.paths(spec).dir, file);
  }

  list(vm: string): { vm: string; current: string | null; snapshots: SnapshotView[] } {
    this.vms.get(vm);
    const rows = this.db.snapshots(vm).filter((s) => s.status === 'ready');
    const current = this.db.snapshotCurrent(vm);
    return {
      vm,
      current,
      snapshots: rows.map((s) => ({ name: s.name, parent: s.parent, createdAt: s.createdAt, memory: !!s.stateFile, current: s.name === current, children: rows.filter((c) => c.parent === s.name).map((c) => c.name) })),
    };
  }

  private find(vm: string, name: string): SnapshotRow {
    const s = this.db.snapshots(vm).find((x) => x.name === name && x.status === 'ready');
    if (!s) throw new FerryError('SNAPSHOT_NOT_FOUND', `VM "${vm}" has no snapshot "${name}"`);
    return s;
  }

  async create(vm: string, name: string, o: { memory?: boolean } = {}): Promise<{ name: string; pauseMs: number; memory: boolean; stateBytes?: number }> {
    if (typeof name !== 'string' || !NAME.test(name)) throw new FerryError('INVALID_NAME', 'a snapshot name is 1–63 letters, digits, ".", "_" or "-", starting with a letter or digit');
    const view = this.vms.get(vm);
    if (this.db.snapshots(vm).some((s) => s.name === name)) throw new FerryError('SNAPSHOT_EXISTS', `VM "${vm}" already has a snapshot "${name}"`);
    const running = isActive(view.runtime) && view.runtime.state !== 'incoming' && view.runtime.state !== 'stopping';
    if (o.memory && !running) throw new FerryError('VM_NOT_RUNNING', `a snapshot with --memory needs VM "${vm}" running (it is ${view.state})`);
    return this.vms.exclusive(vm, async () => {
      const spec = this.vms.get(vm).spec;
      const dir = this.vms.paths(spec).dir;
      const tag = crypto.randomBytes(3).toString('hex');
      const frozen = spec.disks.map((d) => this.abs(spec, d.file));
      const overlays = spec.disks.map((d) => path.join(dir, `${d.id}-${tag}.qcow2`));
      const stateFile = o.memory ? path.join(dir, `state-${name}-${tag}.bin`) : null;
      for (const [i, d] of spec.disks.entries()) await qcow2.createOverlay(overlays[i]!, frozen[i]!, d.sizeBytes, { unsafe: true });
      const row: SnapshotRow = { vm, name, parent: this.db.snapshotCurrent(vm), createdAt: Date.now(), status: 'creating', files: frozen, stateFile, wasRunning: running, prevSpec: spec };
      const next: VmSpec = { ...spec, disks: spec.disks.map((d, i) => ({ ...d, file: overlays[i]! })) };
      // Journal first: the overlays read exactly like the frozen images until QEMU writes to them.
      this.db.tx(() => {
        this.db.putSnapshot(row);
        this.db.setSpec(next);
      });
      const undo = () => {
        this.db.tx(() => {
          this.db.deleteSnapshot(vm, name);
          this.db.setSpec(spec);
        });
        for (const f of overlays) fs.rmSync(f, { force: true });
      };
      let pauseMs = 0;
      let stateBytes: number | undefined;
      try {
        if (running) {
          const { inst } = this.vms.running(vm);
          const tops = await topNodes(inst.qmp, spec.disks.length);
          const plan = tops.map((top, i) => ({ top, overlayFile: overlays[i]!, node: `snap-${tag}-${i}` }));
          if (stateFile) {
            const r = await saveState(inst.qmp, `${this.vms.paths(spec).qmpSocket}.state`, stateFile, async () => void (await liveSnapshot(inst.qmp, plan)));
            pauseMs = r.pauseMs;
            stateBytes = r.bytes;
          } else pauseMs = await liveSnapshot(inst.qmp, plan);
        }
      } catch (e) {
        undo();
        throw e;
      }
      this.db.tx(() => {
        this.db.putSnapshot({ ...row, status: 'ready' });
        this.db.setSnapshotCurrent(vm, name);
      });
      return { name, pauseMs: Math.round(pauseMs * 10) / 10, memory: !!stateFile, ...(stateBytes !== undefined ? { stateBytes } : {}) };
    });
  }

  /** Returns the VM to snapshot `name` (memory too, when the snapshot has it). */
  async revert(vm: string, name: string): Promise<{ name: string; state: string }> {
    const s = this.find(vm, name);
    const view = this.vms.get(vm);
    if (isActive(view.runtime)) await this.vms.stop(vm, { force: true });
    const spec = this.vms.get(vm).spec;
    const snapshotFiles = new Set(this.db.snapshots(vm).flatMap((x) => x.files));
    const tag = crypto.randomBytes(3).toString('hex');
    const dir = this.vms.paths(spec).dir;
    const overlays = spec.disks.map((d) => path.join(dir, `${d.id}-${tag}.qcow2`));
    for (const [i, d] of spec.disks.entries()) await qcow2.createOverlay(overlays[i]!, s.files[i]!, d.sizeBytes, { unsafe: true });
    const left = spec.disks.map((d) => this.abs(spec, d.file)).filter((f) => !snapshotFiles.has(f));
    this.db.tx(() => {
      this.db.setSpec({ ...spec, disks: spec.disks.map((d, i) => ({ ...d, file: overlays[i]! })) });
      this.db.setSnapshotCurrent(vm, name);
    });
    for (const f of left) fs.rmSync(f, { force: true }); // the state we left, which no snapshot holds
    if (s.stateFile) await this.vms.startFromState(vm, s.stateFile, s.wasRunning);
    else if (view.state === 'running' || view.state === 'paused') await this.vms.start(vm);
    return { name, state: this.vms.get(vm).state };
  }

  /** Deletes snapshot `name`, merging its data into every image that reads through it. */
  async delete(vm: string, name: string): Promise<{ name: string; merged: number }> {
    const s = this.find(vm, name);
    return this.vms.exclusive(vm, async () => {
      const all = this.db.snapshots(vm);
      const view = this.vms.get(vm);
      const spec = view.spec;
      const current = this.db.snapshotCurrent(vm);
      const children = all.filter((c) => c.parent === name);
      // Images backed by S's: each child snapshot's, and the VM's own overlays when S is current.
      const targets: { files: string[] }[] = children.map((c) => ({ files: c.files }));
      if (current === name) targets.push({ files: spec.disks.map((d) => this.abs(spec, d.file)) });
      const parentRow = all.find((p) => p.name === s.parent);
      const inst = isActive(view.runtime) ? this.vms.running(vm).inst : undefined;
      let merged = 0;
      for (const t of targets) {
        for (let i = 0; i < spec.disks.length; i++) {
          const base = parentRow ? parentRow.files[i] : (await qcow2.info(s.files[i]!)).backingFile;
          const node = inst ? await nodeOfFile(inst.qmp, t.files[i]!) : undefined;
          if (inst && node) await streamInto(inst.qmp, node, base, `ferry-merge-${i}`);
          else await qcow2.rebase(t.files[i]!, base);
          merged++;
        }
      }
      this.db.tx(() => {
        for (const c of children) this.db.putSnapshot({ ...c, parent: s.parent });
        if (current === name) this.db.setSnapshotCurrent(vm, s.parent);
        this.db.deleteSnapshot(vm, name);
      });
      // Only images Ferry made in the VM's directory go (never a template or an imported disk).
      const dir = this.vms.paths(spec).dir + path.sep;
      for (const f of s.files) if (f.startsWith(dir) && !spec.disks.some((d) => this.abs(spec, d.file) === f)) fs.rmSync(f, { force: true });
      if (s.stateFile) fs.rmSync(s.stateFile, { force: true });
      return { name, merged };
    });
  }

  /**
   * After an agent restart: a snapshot journaled as `creating` took effect if QEMU runs on its
   * overlays (then it is finished), or did not (then the definition goes back). Either way the
   * VM's data is whole: the overlay read exactly like the image it covers.
   */
  async recover(): Promise<string[]> {
    const out: string[] = [];
    for (const v of this.vms.list()) {
      for (const s of this.db.snapshots(v.name).filter((x) => x.status === 'creating')) {
        let took = false;
        if (isActive(v.runtime)) {
          try {
            const { inst } = this.vms.running(v.name);
            took = !!(await nodeOfFile(inst.qmp, this.abs(v.spec, v.spec.disks[0]!.file)));
          } catch {
            took = false;
          }
        }
        if (took) {
          // QEMU writes to the overlays: the snapshot stands (a memory state half-saved is dropped).
          if (s.stateFile) fs.rmSync(s.stateFile, { force: true });
          this.db.tx(() => {
            this.db.putSnapshot({ ...s, status: 'ready', stateFile: null });
            this.db.setSnapshotCurrent(v.name, s.name);
          });
          out.push(`${v.name}/${s.name}: finished${s.stateFile ? ' (disk only: the memory state was not complete)' : ''}`);
        } else {
          const overlays = v.spec.disks.map((d) => this.abs(v.spec, d.file));
          this.db.tx(() => {
            this.db.deleteSnapshot(v.name, s.name);
            this.db.setSpec(s.prevSpec);
          });
          for (const f of overlays) if (!s.files.includes(f)) fs.rmSync(f, { force: true });
          if (s.stateFile) fs.rmSync(s.stateFile, { force: true });
          out.push(`${v.name}/${s.name}: undone`);
        }
      }
    }
    return out;
  }
}
