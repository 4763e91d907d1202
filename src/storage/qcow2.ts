// Why this file exists: creating and inspecting disk images. Every VM disk is qcow2: either
// blank, or an overlay on a read-only template (the guest image's root disk), so a new VM costs
// only what it writes. Only this file runs qemu-img.
import fs from 'node:fs';
import { run } from '../util/exec.js';

export interface ImageInfo {
  virtualSize: number;
  actualSize: number;
  format: string;
  backingFile?: string;
}

export async function createBlank(file: string, sizeBytes: number): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(sizeBytes)]);
}

/**
 * An overlay on `backing`; `sizeBytes` may grow the disk beyond the template's size. `unsafe`
 * does not open the backing (a running QEMU holds its lock); it needs `sizeBytes`.
 */
export async function createOverlay(file: string, backing: string, sizeBytes?: number, o: { unsafe?: boolean } = {}): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', backing, ...(o.unsafe ? ['-u'] : []), file];
  if (sizeBytes) args.push(String(sizeBytes));
  await run('qemu-img', args);
}

export async function info(file: string): Promise<ImageInfo> {
  const r = await run('qemu-img', ['info', '--output=json', '-U', file]);
  const j = JSON.parse(r.stdout) as { 'virtual-size': number; 'actual-size': number; format: string; 'backing-filename'?: string };
  return { virtualSize: j['virtual-size'], actualSize: j['actual-size'], format: j.format, backingFile: j['backing-filename'] };
}

/** Makes `file` read through `backing` (none: standalone), copying what the change needs. */
export async function rebase(file: string, backing: string | undefined): Promise<void> {
  await run('qemu-img', ['rebase', '-q', '-f', 'qcow2', ...(backing ? ['-F', 'qcow2', '-b', backing] : ['-b', '']), file]);
}

/** Rewrites only the backing path in `file`'s header (the data is already there: a copied chain). */
export async function rebaseUnsafe(file: string, backing: string | undefined): Promise<void> {
  await run('qemu-img', ['rebase', '-q', '-u', '-f', 'qcow2', ...(backing ? ['-F', 'qcow2', '-b', backing] : ['-b', '']), file]);
}

export function remove(file: string): void {
  fs.rmSync(file, { force: true });
}
