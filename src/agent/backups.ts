// Why this file exists: the agent's side of backups — the operations that touch a VM (create a
// backup of a running VM, restore to a new VM or in place) as jobs the CLI follows. Commands that
// touch only a store (list, show, verify, prune, export, store *) open the store directly in the
// CLI: a store is a directory, and its writer lock keeps them from colliding with a backup.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { createBackup } from '../backup/create.js';
import { writeImage } from '../backup/restore.js';
import { files } from '../config.js';
import { FerryError } from '../errors.js';
import { openStore, storeInit, type BackupRow, type ChunkStore } from '../store/store.js';
import type { VmSpec } from '../vm/spec.js';
import type { JobView, Jobs } from './jobs.js';
import { macFor, type VmManager } from './vms.js';

export interface StoreRef {
  store?: string;
  keyFile?: string;
}

export class Backups {
  constructor(private readonly vms: VmManager, private readonly jobs: Jobs, private readonly dataDir: string) {}

  /** Opens the named store, or this host's default one (created on first use). */
  open(ref: StoreRef, write: boolean): ChunkStore {
    if (ref.store !== undefined && typeof ref.store !== 'string') throw new FerryError('INVALID_ARGUMENT', 'store must be a directory path');
    const dir = ref.store ? path.resolve(ref.store) : files(this.dataDir).store;
    if (!ref.store && !fs.existsSync(path.join(dir, 'ferry-store.json'))) storeInit(dir);
    return openStore(dir, { ...(ref.keyFile ? { keyFile: ref.keyFile } : {}), write });
  }

  create(vm: string, req: StoreRef & { full?: boolean }): JobView {
    const { rec, inst } = this.vms.running(vm);
    const store = this.open(req, true);
    const spec = rec.spec;
    const run = path.dirname(this.vms.paths(spec).qmpSocket);
    return this.jobs.start('backup', vm, (report) =>
      this.vms
        .exclusive(vm, () =>
          createBackup({
            qmp: inst.qmp,
            spec,
            store,
            tmpDir: path.join(this.vms.paths(spec).dir, '.fleece'),
            nbdSocket: path.join(run, `${spec.uuid.slice(0, 8)}.bnbd`),
            full: !!req.full,
            onProgress: (p) => report(`${p.kind} ${p.phase}`, p.doneBytes, p.totalBytes),
          }),
        )
        .finally(() => store.close()),
    );
  }

  /** Restores backup `backup` to a new VM `name`, or over the stopped VM it came from. */
  restore(req: StoreRef & { backup: string; name?: string; inPlace?: boolean }): JobView {
    if (typeof req.backup !== 'string' || !req.backup) throw new FerryError('INVALID_ARGUMENT', 'backup (an id or id prefix) is required');
    if (!req.name === !req.inPlace) throw new FerryError('INVALID_ARGUMENT', 'give either name (restore to a new VM) or inPlace');
    const store = this.open(req, false);
    let b: BackupRow;
    try {
      b = store.backup(req.backup);
    } catch (e) {
      store.close();
      throw e;
    }
    const from = JSON.parse(b.spec) as VmSpec;
    const disks = store.disks(b.id);
    const total = disks.reduce((a, d) => a + d.size, 0);
    const fillInto = async (dir: string, spec: VmSpec, report: (p: string, d: number, t: number) => void, suffix: string) => {
      let base = 0;
      for (const d of disks) {
        const ds = spec.disks[d.disk]!;
        const file = ds.file.startsWith('/') ? ds.file : path.join(dir, ds.file);
        await writeImage(store, b.id, d.disk, file + suffix, 'qcow2', (p) => report('writing', base + p.doneBytes, total));
        base += d.size;
      }
    };
    if (req.name) {
      const name = req.name;
      const uuid = crypto.randomUUID();
      const spec: VmSpec = { ...from, name, uuid, disks: from.disks.map((d) => ({ id: d.id, file: `${d.id}.qcow2`, sizeBytes: d.sizeBytes })), nics: from.nics.map((n, i) => ({ ...n, mac: macFor(uuid, i) })) };
      if (this.vms.list().some((v) => v.name === name)) {
        store.close();
        throw new FerryError('VM_EXISTS', `a VM named "${name}" already exists`);
      }
      return this.jobs.start('restore', name, (report) => this.vms.importVm(spec, (dir) => fillInto(dir, spec, report, '')).finally(() => store.close()));
    }
    const cur = this.vms.get(from.name);
    if (cur.spec.uuid !== from.uuid) {
      store.close();
      throw new FerryError('INVALID_ARGUMENT', `VM "${from.name}" here is not the VM backup ${b.id} was taken of (uuid ${cur.spec.uuid} vs ${from.uuid})`);
    }
    return this.jobs.start('restore', from.name, (report) =>
      this.vms
        .replaceDisks(from.name, async (spec, dir) => {
          await fillInto(dir, spec, report, '.restore');
          // Every disk is written before any is replaced; each rename is atomic.
          for (const ds of spec.disks) {
            const file = ds.file.startsWith('/') ? ds.file : path.join(dir, ds.file);
            fs.renameSync(file + '.restore', file);
          }
          return { ...spec, disks: spec.disks.map(({ backing: _b, ...d }) => d) };
        })
        .finally(() => store.close()),
    );
  }
}
