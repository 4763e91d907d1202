// Why this file exists: proving from the host that no acknowledged guest write was lost. The
// guest's disk writer reports "FERRY-DURABLE <seq>"; given the seed and that sequence number,
// ferry-guest's checker verifies every record on a disk image. qcow2 images are converted to a
// sparse raw file first (the checker reads raw blocks).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { runAllowFail, run } from '../util/exec.js';

export interface CheckResult {
  ok: boolean;
  output: string;
}

export async function checkDisk(tool: string, image: string, seed: number, upto: number): Promise<CheckResult> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-check-'));
  try {
    const raw = path.join(tmp, 'disk.raw');
    await run('qemu-img', ['convert', '-U', '-O', 'raw', image, raw]);
    const r = await runAllowFail(tool, ['check', '--dev', raw, '--seed', String(seed), '--upto', String(upto)]);
    return { ok: r.code === 0, output: (r.stdout + r.stderr).trim() };
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}
