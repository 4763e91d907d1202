// Why this file exists: the agent's VM manager, the single owner of this host's VMs — their
// definitions and runtime state in the state DB, and the QEMU processes running them. Every
// lifecycle operation goes through here, one at a time per VM (VM_BUSY otherwise), and every
// state change is written to the DB before the API answers.
//
// Invariants: a VM has at most one QEMU (start refuses when the recorded pid still runs that
// VM's QEMU; recover() re-adopts instead of starting); QEMU exiting without Ferry asking marks
// the VM `crashed` with the reason.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { files, insideDataDir, ramFilePrefix } from '../config.js';
import { FerryError } from '../errors.js';
import { readImage } from '../image/catalog.js';
import type { Accel } from '../qemu/accel.js';
import { qemuArgs, type VmPaths } from '../qemu/cmdline.js';
import { QemuInstance, isQemuFor, pidAlive, type ExitInfo } from '../qemu/instance.js';
import { loadState } from '../qemu/snapshot-ops.js';
import type { GuestStats } from '../qemu/serial.js';
import type { StateDb, VmRecord } from '../state/db.js';
import * as qcow2 from '../storage/qcow2.js';
import { LIMITS, checkRange, isActive, validateName, validateWorkload, type DiskSpec, type NicSpec, type VmRuntime, type VmSpec } from '../vm/spec.js';
import { backingPath, installChain, type ChainManifest } from '../migration/snapshot-chain.js';

export interface CreateRequest {
  name: string;
  vcpus?: number;
  memoryMiB?: number;
  image?: string;
  /** Size of the system disk overlay (defaults to the template's size). */
  systemDiskBytes?: number;
  /** Extra disks: a blank one of `sizeBytes`, or an existing qcow2 `file` inside the data dir. */
  disks?: { sizeBytes?: number; file?: string }[];
  nics?: { type: 'user' }[];
  workload?: unknown;
  append?: string;
}

export interface VmView {
  name: string;
  uuid: string;
  state: VmRuntime['state'];
  runtime: VmRuntime;
  spec: VmSpec;
  createdAt: number;
  updatedAt: number;
}

export class VmManager {
  private readonly instances = new Map<string, QemuInstance>();
  private readonly busy = new Set<string>();

  constructor(
    private readonly db: StateDb,
    private readonly dataDir: string,
    private readonly imagesDir: string,
    readonly accel: Accel,
  ) {}

  paths(spec: VmSpec): VmPaths {
    const dir = path.join(files(this.dataDir).vms, spec.name);
    const run = path.join(files(this.dataDir).run, spec.uuid.slice(0, 8));
    return {
      dir,
      qmpSocket: `${run}.qmp`,
      serialSocket: `${run}.serial`,
      pidFile: `${run}.pid`,
      serialLog: path.join(dir, 'serial.log'),
      qemuLog: path.join(dir, 'qemu.log'),
      // /dev/shm is shared by every agent on the machine (the lab runs several): name by data dir.
      ramFile: `${ramFilePrefix(this.dataDir)}${spec.uuid.slice(0, 8)}.ram`,
    };
  }

  list(): VmView[] {
    return this.db.listVms().map(view);
  }

  get(name: string): VmView {
    return view(this.record(name));
  }

  private record(name: string): VmRecord {
    const r = this.db.getVm(name);
    if (!r) throw new FerryError('VM_NOT_FOUND', `no VM named "${name}" on this host`);
    return r;
  }

  /** Runs `fn` holding the VM's operation lock. */
  async exclusive<T>(name: string, fn: () => Promise<T>): Promise<T> {
    if (this.busy.has(name)) throw new FerryError('VM_BUSY', `another operation on VM "${name}" is in progress`);
    this.busy.add(name);
    try {
      return await fn();
    } finally {
      this.busy.delete(name);
    }
  }

  /** Records a state change (and an event). The migration module uses it for its transitions. */
  setRuntime(name: string, rt: VmRuntime, event?: { kind: string; message: string }): void {
    this.db.setRuntime(name, rt);
    if (event) this.db.addEvent(name, event.kind, event.message);
  }

  async create(req: CreateRequest): Promise<VmView> {
    // Validate everything before touching anything.
    const name = validateName(req?.name);
    const vcpus = checkRange('vcpus', req.vcpus ?? 1, LIMITS.vcpus.min, LIMITS.vcpus.max);
    const memoryMiB = checkRange('memory', req.memoryMiB ?? 256, LIMITS.memoryMiB.min, LIMITS.memoryMiB.max, ' MiB');
    const workload = validateWorkload(req.workload);
    if (req.append !== undefined && (typeof req.append !== 'string' || req.append.length > 1024 || /[\n\0]/.test(req.append))) {
      throw new FerryError('INVALID_ARGUMENT', 'append must be a single line of at most 1024 characters');
    }
    const extra = req.disks ?? [];
    if (!Array.isArray(extra) || extra.length > LIMITS.disks.max - 1) throw new FerryError('INVALID_ARGUMENT', `disks must be a list of at most ${LIMITS.disks.max - 1}`);
    const nicsReq = req.nics ?? [];
    if (!Array.isArray(nicsReq) || nicsReq.length > LIMITS.nics.max) throw new FerryError('INVALID_ARGUMENT', `nics must be a list of at most ${LIMITS.nics.max}`);
    for (const n of nicsReq) if (n?.type !== 'user') throw new FerryError('INVALID_ARGUMENT', `nic type must be "user"`);
    const image = req.image === undefined ? undefined : readImage(this.imagesDir, String(req.image));
    if (!image && extra.length === 0) throw new FerryError('INVALID_ARGUMENT', 'a VM needs an image or at least one disk to boot from');
    if (req.systemDiskBytes !== undefined) checkRange('system disk size', req.systemDiskBytes, image?.manifest.rootSizeBytes ?? LIMITS.diskBytes.min, LIMITS.diskBytes.max, ' bytes');
    const imports: (string | undefined)[] = extra.map((d, i) => {
      if (d?.file !== undefined) {
        const abs = insideDataDir(this.dataDir, String(d.file));
        if (!fs.existsSync(abs)) throw new FerryError('INVALID_ARGUMENT', `disk ${i + 1}: ${d.file} does not exist`);
        return abs;
      }
      checkRange(`disk ${i + 1} size`, d?.sizeBytes, LIMITS.diskBytes.min, LIMITS.diskBytes.max, ' bytes');
      return undefined;
    });
    if (this.db.getVm(name)) throw new FerryError('VM_EXISTS', `a VM named "${name}" already exists`);

    return this.exclusive(name, async () => {
      const uuid = crypto.randomUUID();
      const disks: DiskSpec[] = [];
      const spec: VmSpec = { name, uuid, vcpus, memoryMiB, disks, nics: [] };
      const p = this.paths(spec);
      fs.mkdirSync(p.dir, { recursive: true, mode: 0o700 });
      try {
        if (image) {
          spec.image = image.name;
          spec.kernel = image.kernel;
          spec.initrd = image.initrd;
          const size = req.systemDiskBytes ?? image.manifest.rootSizeBytes;
          await qcow2.createOverlay(path.join(p.dir, 'vda.qcow2'), image.root, size);
          disks.push({ id: 'vda', file: 'vda.qcow2', sizeBytes: size, backing: image.root });
        }
        for (const [i, d] of extra.entries()) {
          const id = `vd${String.fromCharCode(97 + disks.length)}`;
          const imported = imports[i];
          if (imported) {
            const inf = await qcow2.info(imported);
            if (inf.format !== 'qcow2') throw new FerryError('INVALID_ARGUMENT', `disk ${imported} is ${inf.format}, not qcow2`);
            disks.push({ id, file: imported, sizeBytes: inf.virtualSize });
          } else {
            await qcow2.createBlank(path.join(p.dir, `${id}.qcow2`), d.sizeBytes!);
            disks.push({ id, file: `${id}.qcow2`, sizeBytes: d.sizeBytes! });
          }
        }
        spec.nics = nicsReq.map((_, i): NicSpec => ({ id: `net${i}`, type: 'user', mac: macFor(uuid, i) }));
        if (workload) spec.workload = workload;
        if (req.append) spec.append = req.append;
        this.db.insertVm(spec, { state: 'stopped' });
        this.db.addEvent(name, 'created', `${vcpus} vCPU, ${memoryMiB} MiB, ${disks.length} disk(s)${image ? `, image ${image.name}` : ''}`);
      } catch (e) {
        fs.rmSync(p.dir, { recursive: true, force: true });
        throw e;
      }
      return this.get(name);
    });
  }

  /**
   * Defines a VM whose disks `fill` writes into its new directory (a restore from a backup).
   * Nothing is left behind if `fill` fails.
   */
  async importVm(spec: VmSpec, fill: (dir: string) => Promise<void>): Promise<VmView> {
    validateName(spec.name);
    if (this.db.getVm(spec.name)) throw new FerryError('VM_EXISTS', `a VM named "${spec.name}" already exists`);
    return this.exclusive(spec.name, async () => {
      const p = this.paths(spec);
      if (fs.existsSync(p.dir)) throw new FerryError('VM_EXISTS', `${p.dir} already exists`);
      fs.mkdirSync(p.dir, { recursive: true, mode: 0o700 });
      try {
        await fill(p.dir);
        this.db.insertVm(spec, { state: 'stopped' });
        this.db.addEvent(spec.name, 'created', `restored: ${spec.disks.length} disk(s)`);
      } catch (e) {
        fs.rmSync(p.dir, { recursive: true, force: true });
        throw e;
      }
      return this.get(spec.name);
    });
  }

  /** Replaces a stopped VM's disk files and definition (restore in place); holds the VM's lock. */
  async replaceDisks(name: string, fill: (spec: VmSpec, dir: string) => Promise<VmSpec>): Promise<VmView> {
    return this.exclusive(name, async () => {
      const rec = this.record(name);
      if (isActive(rec.runtime) || rec.runtime.state === 'starting') throw new FerryError('VM_RUNNING', `VM "${name}" is ${rec.runtime.state}: stop it to restore in place (or restore to a new VM with --name)`);
      const spec = await fill(rec.spec, this.paths(rec.spec).dir);
      this.db.setSpec(spec);
      this.db.addEvent(name, 'restored', 'disks restored in place from a backup');
      return this.get(name);
    });
  }

  /**
   * Migration destination: defines the VM from the source's spec (same name, uuid, sizes,
   * workload), creates empty disks (an overlay on the same template when this host has it),
   * and starts QEMU paused with `-incoming defer`. State `incoming` until the migration finishes.
   */
  async createIncoming(src: VmSpec, from: string, o: { cacheDir?: string; chain?: ChainManifest } = {}): Promise<{ view: VmView; inst: QemuInstance; bases: ('template' | 'zero' | 'cached')[] }> {
    const name = validateName(src?.name);
    if (this.db.getVm(name)) throw new FerryError('VM_EXISTS', `a VM named "${name}" already exists on this host`);
    return this.exclusive(name, async () => {
      const spec: VmSpec = { ...src, disks: [], nics: src.nics ?? [] };
      if (src.image) {
        const image = readImage(this.imagesDir, src.image);
        spec.kernel = image.kernel;
        spec.initrd = image.initrd;
      }
      const p = this.paths(spec);
      fs.mkdirSync(p.dir, { recursive: true, mode: 0o700 });
      const bases: ('template' | 'zero' | 'cached')[] = [];
      try {
        // A VM with snapshots: its tree's files arrived in the cache; its disks are overlays on
        // the current point of that chain, to which the migration copies the top layer only.
        const snapshots = o.chain && o.cacheDir ? await installChain(o.chain, o.cacheDir, p.dir, name, spec) : [];
        const taken = new Set(o.chain?.files.map((f) => f.name));
        for (const [i, d] of src.disks.entries()) {
          const file = freeName(d.id, taken);
          const cached = o.cacheDir ? path.join(o.cacheDir, file) : '';
          const reuse = cached !== '' && fs.existsSync(cached) && (await qcow2.info(cached)).virtualSize === d.sizeBytes;
          if (o.chain) {
            // On the chain's current point: a previous attempt's copy (pointed there again), or new.
            const over = backingPath(o.chain.tops[i], p.dir);
            if (reuse) {
              fs.renameSync(cached, path.join(p.dir, file));
              await qcow2.rebaseUnsafe(path.join(p.dir, file), over);
            } else if (over) await qcow2.createOverlay(path.join(p.dir, file), over, d.sizeBytes);
            else await qcow2.createBlank(path.join(p.dir, file), d.sizeBytes);
            spec.disks.push({ id: d.id, file, sizeBytes: d.sizeBytes, ...(d.backing ? { backing: d.backing } : {}) });
            bases.push(reuse ? 'cached' : over ? 'template' : 'zero');
          } else if (reuse) {
            // A previous attempt's copy: the migration sends only what differs from it.
            fs.renameSync(cached, path.join(p.dir, file));
            spec.disks.push({ id: d.id, file, sizeBytes: d.sizeBytes, ...(d.backing && fs.existsSync(d.backing) ? { backing: d.backing } : {}) });
            bases.push('cached');
          } else if (d.backing && fs.existsSync(d.backing)) {
            await qcow2.createOverlay(path.join(p.dir, file), d.backing, d.sizeBytes);
            spec.disks.push({ id: d.id, file, sizeBytes: d.sizeBytes, backing: d.backing });
            bases.push('template');
          } else {
            await qcow2.createBlank(path.join(p.dir, file), d.sizeBytes);
            spec.disks.push({ id: d.id, file, sizeBytes: d.sizeBytes });
            bases.push('zero');
          }
        }
        this.db.tx(() => {
          this.db.insertVm(spec, { state: 'stopped' });
          for (const s of snapshots) this.db.putSnapshot({ ...s, prevSpec: spec });
          if (o.chain) this.db.setSnapshotCurrent(name, o.chain.current);
        });
        this.db.addEvent(name, 'created', `incoming migration from ${from}${snapshots.length ? ` with ${snapshots.length} snapshot(s)` : ''}`);
        fs.mkdirSync(path.dirname(p.qmpSocket), { recursive: true });
        const inst = await freshLaunch(qemuArgs(spec, p, this.accel, { startPaused: true, incoming: true }), p);
        this.adopt(name, inst);
        this.setRuntime(name, { state: 'incoming', pid: inst.pid, startedAt: Date.now(), from }, { kind: 'incoming', message: `QEMU pid ${inst.pid} waiting for migration from ${from}` });
        return { view: this.get(name), inst, bases };
      } catch (e) {
        this.instances.get(name)?.kill();
        this.instances.delete(name);
        this.db.deleteVm(name);
        fs.rmSync(p.dir, { recursive: true, force: true });
        throw e;
      }
    });
  }

  /**
   * Takes a VM's operation lock for a long operation (a migration) that releases it itself;
   * lifecycle calls meanwhile get VM_BUSY.
   */
  reserve(name: string): void {
    this.record(name);
    if (this.busy.has(name)) throw new FerryError('VM_BUSY', `another operation on VM "${name}" is in progress`);
    this.busy.add(name);
  }

  release(name: string): void {
    this.busy.delete(name);
  }

  /** Records that an active VM's guest runs (after a migration rolled back). */
  noteRunning(name: string, why: string): void {
    const { rec, inst } = this.running(name);
    const startedAt = 'startedAt' in rec.runtime ? rec.runtime.startedAt : Date.now();
    this.setRuntime(name, { state: 'running', pid: inst.pid, startedAt }, { kind: 'resumed', message: why });
  }

  /** Destination: the migrated VM runs here now (QEMU was continued by the migration). */
  activateIncoming(name: string, from: string): void {
    const { rec, inst } = this.running(name);
    const startedAt = 'startedAt' in rec.runtime ? rec.runtime.startedAt : Date.now();
    this.setRuntime(name, { state: 'running', pid: inst.pid, startedAt }, { kind: 'migrated-in', message: `now running here (migrated from ${from})` });
  }

  /** Ends a VM's QEMU for a migration's end: quit over QMP, or SIGKILL a QEMU we lost track of. */
  private async endQemu(rec: VmRecord): Promise<void> {
    const name = rec.spec.name;
    const inst = this.instances.get(name);
    this.instances.delete(name);
    if (inst && !inst.hasExited) await inst.quit().catch(() => inst.kill());
    else if ('pid' in rec.runtime && rec.runtime.pid && pidAlive(rec.runtime.pid) && isQemuFor(rec.runtime.pid, rec.spec.uuid)) process.kill(rec.runtime.pid, 'SIGKILL');
  }

  /**
   * Destination, migration aborted: kills the incoming QEMU, keeps the partial disks in
   * `cacheDir` (a retry sends only what they lack) and forgets the VM.
   */
  async discardIncoming(name: string, cacheDir: string): Promise<void> {
    const rec = this.db.getVm(name);
    if (!rec) return;
    await this.endQemu(rec);
    const p = this.paths(rec.spec);
    fs.rmSync(cacheDir, { recursive: true, force: true });
    fs.mkdirSync(cacheDir, { recursive: true, mode: 0o700 });
    // The disks, and the snapshot tree's files (a retry sends only what these lack).
    const snaps = this.db.snapshots(name).flatMap((s) => [...s.files, ...(s.stateFile ? [s.stateFile] : [])]);
    for (const f of [...rec.spec.disks.map((d) => path.join(p.dir, d.file)), ...snaps.filter((x) => path.dirname(x) === p.dir)]) {
      try {
        if (fs.existsSync(f)) fs.renameSync(f, path.join(cacheDir, path.basename(f)));
      } catch {
        fs.rmSync(f, { force: true }); // another filesystem (or full): no cache, a retry sends all
      }
    }
    fs.rmSync(p.dir, { recursive: true, force: true });
    for (const f of [p.qmpSocket, p.serialSocket, p.pidFile]) fs.rmSync(f, { force: true });
    this.db.deleteVm(name);
    this.db.addEvent(name, 'incoming-discarded', `incoming migration aborted; partial disks kept in ${cacheDir} for a retry`);
  }

  /**
   * Source, after the destination confirmed: quit QEMU, then delete the VM with its disks, or
   * with `keep` leave it defined and stopped ("migrated to …") as libvirt does (lock held).
   */
  async migratedAway(name: string, to: string, keep = false): Promise<void> {
    const rec = this.db.getVm(name);
    if (!rec) return;
    await this.endQemu(rec);
    if (keep) {
      this.setRuntime(name, { state: 'stopped', reason: `migrated to ${to}` }, { kind: 'migrated-away', message: `migrated to ${to}; source copy kept (stopped)` });
      return;
    }
    const p = this.paths(rec.spec);
    for (const d of rec.spec.disks) if (!d.file.startsWith('/')) qcow2.remove(path.join(p.dir, d.file));
    fs.rmSync(p.dir, { recursive: true, force: true });
    for (const f of [p.qmpSocket, p.serialSocket, p.pidFile]) fs.rmSync(f, { force: true });
    this.db.deleteVm(name);
    this.db.addEvent(name, 'migrated-away', `migrated to ${to}; source copy removed`);
  }

  async start(name: string): Promise<VmView> {
    return this.exclusive(name, async () => {
      const rec = this.record(name);
      const rt = rec.runtime;
      if (isActive(rt) || rt.state === 'starting') {
        if ('pid' in rt && rt.pid && pidAlive(rt.pid) && isQemuFor(rt.pid, rec.spec.uuid)) {
          throw new FerryError('VM_RUNNING', `VM "${name}" is already ${rt.state} (QEMU pid ${rt.pid})`);
        }
      }
      const inst = await this.launchPaused(rec, false);
      await inst.resume();
      const startedAt = Date.now();
      this.setRuntime(name, { state: 'running', pid: inst.pid, startedAt }, { kind: 'started', message: `QEMU pid ${inst.pid} (${this.accel})` });
      return this.get(name);
    });
  }

  /**
   * Starts a stopped VM from a saved RAM/device state (a snapshot taken with memory): QEMU starts
   * with `-incoming defer`, loads the state file, and runs (or stays paused).
   */
  async startFromState(name: string, stateFile: string, run: boolean): Promise<VmView> {
    return this.exclusive(name, async () => {
      const rec = this.record(name);
      if (isActive(rec.runtime)) throw new FerryError('VM_RUNNING', `VM "${name}" is ${rec.runtime.state}`);
      const inst = await this.launchPaused(rec, true);
      try {
        await loadState(inst.qmp, `${this.paths(rec.spec).qmpSocket}.state`, stateFile);
      } catch (e) {
        inst.kill();
        throw e;
      }
      if (run) await inst.resume();
      this.setRuntime(name, run ? { state: 'running', pid: inst.pid, startedAt: Date.now() } : { state: 'paused', pid: inst.pid, startedAt: Date.now() }, { kind: 'started', message: `QEMU pid ${inst.pid}, from saved state` });
      return this.get(name);
    });
  }

  /** Launches a VM's QEMU paused (`-S`, or `-incoming defer`) and adopts it; `crashed` if it fails. */
  private async launchPaused(rec: VmRecord, incoming: boolean): Promise<QemuInstance> {
    const name = rec.spec.name;
    const p = this.paths(rec.spec);
    fs.mkdirSync(path.dirname(p.qmpSocket), { recursive: true });
    this.setRuntime(name, { state: 'starting' });
    let inst: QemuInstance;
    try {
      inst = await freshLaunch(qemuArgs(rec.spec, p, this.accel, { startPaused: true, ...(incoming ? { incoming: true } : {}) }), p);
    } catch (e) {
      const reason = (e as Error).message;
      this.setRuntime(name, { state: 'crashed', reason, at: Date.now() }, { kind: 'start-failed', message: reason });
      throw e;
    }
    this.adopt(name, inst);
    return inst;
  }

  /** Wires an instance's exit to the VM's state. */
  private adopt(name: string, inst: QemuInstance): void {
    this.instances.set(name, inst);
    inst.once('exit', (info: ExitInfo) => {
      const cur = this.instances.get(name);
      if (!cur || cur === inst) fs.rmSync(inst.paths.ramFile, { force: true }); // guest RAM
      if (cur !== inst) return;
      this.instances.delete(name);
      if (!this.db.getVm(name)) return;
      if (info.expected || info.guestShutdown) {
        this.setRuntime(name, { state: 'stopped', reason: info.reason }, { kind: 'stopped', message: info.reason });
      } else {
        this.setRuntime(name, { state: 'crashed', reason: info.reason, at: Date.now() }, { kind: 'crashed', message: info.reason });
      }
    });
  }

  /** The live QEMU of an active VM (for the migration module, which speaks QMP through it). */
  running(name: string): { rec: VmRecord; inst: QemuInstance } {
    const rec = this.record(name);
    const inst = this.instances.get(name);
    if (!inst || !isActive(rec.runtime)) throw new FerryError('VM_NOT_RUNNING', `VM "${name}" is ${rec.runtime.state}`);
    return { rec, inst };
  }

  async pause(name: string): Promise<VmView> {
    return this.exclusive(name, async () => {
      const { rec, inst } = this.running(name);
      if (rec.runtime.state !== 'running') throw new FerryError('VM_NOT_RUNNING', `VM "${name}" is ${rec.runtime.state}, not running`);
      await inst.pause();
      this.setRuntime(name, { state: 'paused', pid: inst.pid, startedAt: rec.runtime.startedAt }, { kind: 'paused', message: 'paused by operator' });
      return this.get(name);
    });
  }

  async resume(name: string): Promise<VmView> {
    return this.exclusive(name, async () => {
      const { rec, inst } = this.running(name);
      if (rec.runtime.state !== 'paused') throw new FerryError('VM_NOT_RUNNING', `VM "${name}" is ${rec.runtime.state}, not paused`);
      await inst.resume();
      this.setRuntime(name, { state: 'running', pid: inst.pid, startedAt: rec.runtime.startedAt }, { kind: 'resumed', message: 'resumed by operator' });
      return this.get(name);
    });
  }

  /**
   * Graceful: ACPI power button, then after `timeoutSec` QEMU quit (and SIGKILL if it lingers).
   * force: quit at once.
   */
  async stop(name: string, opts: { force?: boolean; timeoutSec?: number } = {}): Promise<VmView> {
    return this.exclusive(name, () => this.stopLocked(name, opts));
  }

  private async stopLocked(name: string, opts: { force?: boolean; timeoutSec?: number }): Promise<VmView> {
    const timeoutSec = checkRange('timeout', opts.timeoutSec ?? 30, 0, 3600, ' s');
    const { rec, inst } = this.running(name);
    const startedAt = 'startedAt' in rec.runtime ? rec.runtime.startedAt : Date.now();
    this.setRuntime(name, { state: 'stopping', pid: inst.pid, startedAt });
    this.instances.delete(name); // this stop, not the exit handler, records the outcome
    let how = 'forced';
    if (!opts.force && timeoutSec > 0) {
      if (rec.runtime.state === 'paused') await inst.resume().catch(() => {});
      await inst.powerdown().catch(() => {});
      if (await inst.waitExit(timeoutSec * 1000)) how = 'graceful';
    }
    if (!inst.hasExited) await inst.quit();
    this.setRuntime(name, { state: 'stopped', reason: `stopped by operator (${how})` }, { kind: 'stopped', message: `stopped (${how})` });
    return this.get(name);
  }

  async restart(name: string, opts: { force?: boolean; timeoutSec?: number } = {}): Promise<VmView> {
    await this.stop(name, opts);
    return this.start(name);
  }

  async delete(name: string, opts: { force?: boolean; keepDisks?: boolean } = {}): Promise<{ deleted: string; keptDisks: string[] }> {
    return this.exclusive(name, async () => {
      const rec = this.record(name);
      if (isActive(rec.runtime) || rec.runtime.state === 'starting') {
        if (!opts.force) throw new FerryError('VM_RUNNING', `VM "${name}" is ${rec.runtime.state}: stop it first or pass --force`);
        if (this.instances.has(name)) await this.stopLocked(name, { force: true });
      }
      const p = this.paths(rec.spec);
      const kept: string[] = [];
      if (opts.keepDisks) {
        for (const d of rec.spec.disks) kept.push(d.file.startsWith('/') ? d.file : path.join(p.dir, d.file));
      } else {
        for (const d of rec.spec.disks) if (!d.file.startsWith('/')) qcow2.remove(path.join(p.dir, d.file));
        fs.rmSync(p.dir, { recursive: true, force: true });
      }
      for (const f of [p.qmpSocket, p.serialSocket, p.pidFile]) fs.rmSync(f, { force: true });
      this.db.deleteVm(name);
      this.db.addEvent(name, 'deleted', opts.keepDisks ? `deleted, disks kept: ${kept.join(', ')}` : 'deleted with its disks');
      return { deleted: name, keptDisks: kept };
    });
  }

  guestStats(name: string): GuestStats {
    const { inst } = this.running(name);
    return { ...inst.serial.stats };
  }

  resetGuestGap(name: string): void {
    this.running(name).inst.serial.resetGap();
  }

  sendConsole(name: string, text: string): void {
    if (typeof text !== 'string' || text.length > 4096) throw new FerryError('INVALID_ARGUMENT', 'console input must be a string of at most 4096 characters');
    this.running(name).inst.serial.write(text);
  }

  consoleLogPath(name: string): string {
    return this.paths(this.record(name).spec).serialLog;
  }

  /**
   * Agent start: re-adopt QEMU processes an earlier agent left running; a VM recorded as active
   * whose QEMU is gone is marked crashed. Never starts anything.
   */
  async recover(): Promise<{ reattached: string[]; crashed: string[] }> {
    const reattached: string[] = [];
    const crashed: string[] = [];
    for (const rec of this.db.listVms()) {
      const rt = rec.runtime;
      if (!(isActive(rt) || rt.state === 'starting')) continue;
      const pid = 'pid' in rt ? rt.pid : undefined;
      if (pid && pidAlive(pid) && isQemuFor(pid, rec.spec.uuid)) {
        try {
          const inst = await QemuInstance.attach(pid, rec.spec.uuid, this.paths(rec.spec));
          this.adopt(rec.spec.name, inst);
          const st = await inst.status();
          const startedAt = 'startedAt' in rt ? rt.startedAt : Date.now();
          const state = st.status === 'paused' || !st.running ? 'paused' : 'running';
          this.setRuntime(rec.spec.name, { state, pid, startedAt }, { kind: 'reattached', message: `re-attached to QEMU pid ${pid} (${st.status})` });
          reattached.push(rec.spec.name);
          continue;
        } catch (e) {
          const reason = `QEMU pid ${pid} is alive but cannot be re-attached: ${(e as Error).message}`;
          this.setRuntime(rec.spec.name, { state: 'crashed', reason, at: Date.now() }, { kind: 'crashed', message: reason });
          crashed.push(rec.spec.name);
          continue;
        }
      }
      const reason = 'QEMU exited while the agent was not running';
      this.setRuntime(rec.spec.name, { state: 'crashed', reason, at: Date.now() }, { kind: 'crashed', message: reason });
      crashed.push(rec.spec.name);
    }
    // Guest RAM of VMs whose QEMU is gone.
    for (const c of crashed) {
      const r = this.db.getVm(c);
      if (r) fs.rmSync(this.paths(r.spec).ramFile, { force: true });
    }
    return { reattached, crashed };
  }

  /** Agent shutdown: leave every VM running, drop our connections to them. */
  detachAll(): void {
    for (const inst of this.instances.values()) inst.detach();
    this.instances.clear();
  }
}

function view(r: VmRecord): VmView {
  return { name: r.spec.name, uuid: r.spec.uuid, state: r.runtime.state, runtime: r.runtime, spec: r.spec, createdAt: r.createdAt, updatedAt: r.updatedAt };
}

/** A stable locally administered MAC from the VM's uuid. */
export function macFor(uuid: string, index: number): string {
  const h = crypto.createHash('sha256').update(`${uuid}/${index}`).digest();
  return ['52', '54', '00', h[0], h[1], h[2]].map((b) => (typeof b === 'number' ? b.toString(16).padStart(2, '0') : b)).join(':');
}

/** Launches QEMU on a fresh guest-RAM file (a stale one would show the guest old memory). */
function freshLaunch(args: string[], p: VmPaths): Promise<QemuInstance> {
  fs.rmSync(p.ramFile, { force: true });
  return QemuInstance.launch(args, p);
}

/** `<id>.qcow2`, or `<id>-top[N].qcow2` when a snapshot image of the migrated chain has that name. */
function freeName(id: string, taken: Set<string>): string {
  for (let n = 0; ; n++) {
    const f = n === 0 ? `${id}.qcow2` : `${id}-top${n > 1 ? n : ''}.qcow2`;
    if (!taken.has(f)) return f;
  }
}
