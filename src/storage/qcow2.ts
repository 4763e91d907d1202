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

/** An overlay on `backing`; `sizeBytes` may grow the disk beyond the template's size. */
export async function createOverlay(file: string, backing: string, sizeBytes?: number): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', backing, file];
  if (sizeBytes) args.push(String(sizeBytes));
  await run('qemu-img', args);
}

export async function info(file: string): Promise<ImageInfo> {
  const r = await run('qemu-img', ['info', '--output=json', '-U', file]);
  const j = JSON.parse(r.stdout) as { 'virtual-size': number; 'actual-size': number; format: string; 'backing-filename'?: string };
  return { virtualSize: j['virtual-size'], actualSize: j['actual-size'], format: j.format, backingFile: j['backing-filename'] };
}

export function remove(file: string): void {
  fs.rmSync(file, { force: true });
}
