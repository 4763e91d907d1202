// Why this file exists: resolving an image name (e.g. "ferry-guest") to its files in the images
// directory. An image is a folder holding manifest.json, and for direct kernel boot vmlinuz and
// initrd.img, plus root.qcow2: the read-only template a VM's system disk is an overlay on.
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.js';
import { VM_NAME_RE } from '../vm/spec.js';

export interface ImageManifest {
  name: string;
  inputsHash: string;
  builtAt: string;
  kernelPackage: string;
  rootSizeBytes: number;
  files: { kernel: string; initrd: string; root: string; tool: string };
}

export interface ResolvedImage {
  name: string;
  dir: string;
  kernel: string;
  initrd: string;
  root: string;
  tool: string;
  manifest: ImageManifest;
}

export function readImage(imagesDir: string, name: string): ResolvedImage {
  if (!VM_NAME_RE.test(name)) throw new FerryError('INVALID_ARGUMENT', `invalid image name ${JSON.stringify(name)}`);
  const dir = path.join(imagesDir, name);
  let manifest: ImageManifest;
  try {
    manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as ImageManifest;
  } catch {
    throw new FerryError('IMAGE_NOT_FOUND', `no image "${name}" in ${imagesDir} (build it with \`ferry image build-guest\`)`);
  }
  const f = (n: string) => path.join(dir, n);
  const r = { name, dir, kernel: f(manifest.files.kernel), initrd: f(manifest.files.initrd), root: f(manifest.files.root), tool: f(manifest.files.tool), manifest };
  for (const p of [r.kernel, r.initrd, r.root]) {
    if (!fs.existsSync(p)) throw new FerryError('IMAGE_NOT_FOUND', `image "${name}" is incomplete: ${p} is missing (rebuild it)`);
  }
  return r;
}

export function listImages(imagesDir: string): ImageManifest[] {
  let names: string[] = [];
  try {
    names = fs.readdirSync(imagesDir);
  } catch {
    return [];
  }
  const out: ImageManifest[] = [];
  for (const n of names.sort()) {
    try {
      out.push(readImage(imagesDir, n).manifest);
    } catch {
      /* not an image */
    }
  }
  return out;
}
