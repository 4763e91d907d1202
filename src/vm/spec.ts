// Why this file exists: the one definition of what a VM *is* (its spec) and what state it can be
// in. The agent stores these, qemu/ turns a spec into a command line, the CLI prints them.
// Validation of untrusted input lives here too, so the API and any future caller agree.
import { FerryError } from '../errors.js';

export const VM_NAME_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;

export const LIMITS = {
  vcpus: { min: 1, max: 64 },
  memoryMiB: { min: 32, max: 1024 * 1024 },
  diskBytes: { min: 1024 * 1024, max: 64 * 1024 ** 4 },
  disks: { max: 16 },
  nics: { max: 8 },
} as const;

/** The guest workload Ferry's test image runs (see guest/init); all optional. */
export interface Workload {
  heartbeatHz?: number;
  writeRate?: number; // bytes/s for the disk writer on the data disk (vdb)
  seed?: number;
  writeStart?: number;
  dirtyMiB?: number;
}

export interface DiskSpec {
  /** Guest-visible id: vda, vdb, … in attach order. */
  id: string;
  /** File name relative to the VM's directory inside the data dir. */
  file: string;
  sizeBytes: number;
  /** Absolute path of a read-only qcow2 backing template, if the disk is an overlay. */
  backing?: string;
}

export interface NicSpec {
  id: string;
  /** user: QEMU's user-mode network (no host setup); none: device absent. */
  type: 'user';
  mac: string;
}

export interface VmSpec {
  name: string;
  uuid: string;
  vcpus: number;
  memoryMiB: number;
  /** Guest image providing kernel, initrd and root template (direct kernel boot); absent = BIOS boot from vda. */
  image?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  workload?: Workload;
  disks: DiskSpec[];
  nics: NicSpec[];
}

/**
 * Runtime state, a discriminated union on `state`. Transitions (enforced by the agent):
 *   stopped --start--> starting --QEMU up--> running <--pause/resume--> paused
 *   running|paused --stop--> stopping --QEMU gone--> stopped
 *   starting|running|paused|stopping --QEMU died unexpectedly--> crashed --start--> starting
 *   (destination) incoming --migration completed--> running;  (source) running --migrated--> stopped
 */
export type VmRuntime =
  | { state: 'stopped'; reason?: string }
  | { state: 'starting'; pid?: number }
  | { state: 'running'; pid: number; startedAt: number }
  | { state: 'paused'; pid: number; startedAt: number }
  | { state: 'stopping'; pid: number; startedAt: number }
  | { state: 'incoming'; pid: number; startedAt: number; from?: string }
  | { state: 'crashed'; reason: string; at: number };

export type VmState = VmRuntime['state'];

export function isActive(r: VmRuntime): r is Extract<VmRuntime, { pid: number }> {
  return r.state === 'running' || r.state === 'paused' || r.state === 'stopping' || r.state === 'incoming';
}

export function validateName(name: unknown): string {
  if (typeof name !== 'string' || !VM_NAME_RE.test(name)) {
    throw new FerryError('INVALID_NAME', `invalid VM name ${JSON.stringify(name)}: use 1-63 of a-z, 0-9 and '-', starting with a letter or digit`);
  }
  return name;
}

export function checkRange(what: string, v: unknown, min: number, max: number, unit = ''): number {
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new FerryError('INVALID_ARGUMENT', `${what} must be an integer`);
  if (v < min || v > max) throw new FerryError('SIZE_OUT_OF_RANGE', `${what} ${v}${unit} is out of range (${min}${unit}..${max}${unit})`);
  return v;
}

export function validateWorkload(w: unknown): Workload | undefined {
  if (w === undefined || w === null) return undefined;
  if (typeof w !== 'object') throw new FerryError('INVALID_ARGUMENT', 'workload must be an object');
  const o = w as Record<string, unknown>;
  const out: Workload = {};
  const allowed = ['heartbeatHz', 'writeRate', 'seed', 'writeStart', 'dirtyMiB'] as const;
  for (const k of Object.keys(o)) {
    if (!(allowed as readonly string[]).includes(k)) throw new FerryError('INVALID_ARGUMENT', `workload.${k} is not a known field`);
  }
  if (o.heartbeatHz !== undefined) out.heartbeatHz = checkRange('workload.heartbeatHz', o.heartbeatHz, 0, 1000);
  if (o.writeRate !== undefined) out.writeRate = checkRange('workload.writeRate', o.writeRate, 0, 1024 ** 3);
  if (o.seed !== undefined) out.seed = checkRange('workload.seed', o.seed, 0, 2 ** 48);
  if (o.writeStart !== undefined) out.writeStart = checkRange('workload.writeStart', o.writeStart, 1, 2 ** 48);
  if (o.dirtyMiB !== undefined) out.dirtyMiB = checkRange('workload.dirtyMiB', o.dirtyMiB, 0, 1024 * 1024);
  return out;
}

/** Kernel command line for direct kernel boot of Ferry's guest image. */
export function kernelCmdline(spec: VmSpec): string {
  const parts = ['console=ttyS0', 'quiet', 'panic=-1'];
  const w = spec.workload;
  const dataDisk = spec.disks[1];
  if (w) {
    if (w.heartbeatHz !== undefined) parts.push(`ferry.hb=${w.heartbeatHz}`);
    if (w.writeRate && dataDisk) {
      parts.push(`ferry.wdev=/dev/${dataDisk.id}`, `ferry.wrate=${w.writeRate}`, `ferry.seed=${w.seed ?? 1}`);
      if (w.writeStart) parts.push(`ferry.wstart=${w.writeStart}`);
    }
    if (w.dirtyMiB) parts.push(`ferry.dirty=${w.dirtyMiB}`);
  }
  if (spec.append) parts.push(spec.append);
  return parts.join(' ');
}
