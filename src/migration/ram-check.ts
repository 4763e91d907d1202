// Why this file exists: a diagnostic that compares guest RAM on both hosts while the guest is
// paused (FERRY_DEBUG_RAMCMP=1). The RAM stream itself is always checked end to end (ram-pipe.ts
// hashes it on both sides); this goes further and checks what QEMU made of it: the source's RAM
// after its stream ended against the destination's after it loaded, page by page. It costs a
// dump of guest memory on each side inside the pause, so it is off unless asked for.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pmemsave } from '../qemu/migration-ops.js';
import type { QmpClient } from '../qemu/qmp.js';

const PAGE = 4096;

export const ramCompareEnabled = () => !!process.env.FERRY_DEBUG_RAMCMP;

/** 8-byte SHA-256 prefixes of each 4 KiB page of guest memory [0, bytes), base64. */
export async function guestPageHashes(qmp: QmpClient, bytes: number, dir: string, tag: string): Promise<string> {
  const file = path.join(dir, `ramcmp-${tag}-${process.pid}.bin`);
  await pmemsave(qmp, bytes, file);
  const mem = fs.readFileSync(file);
  if (process.env.FERRY_DEBUG_RAMCMP !== 'keep') fs.rmSync(file, { force: true });
  const out = Buffer.alloc((mem.length / PAGE) * 8);
  for (let p = 0; p * PAGE < mem.length; p++) crypto.createHash('sha256').update(mem.subarray(p * PAGE, (p + 1) * PAGE)).digest().copy(out, p * 8, 0, 8);
  return out.toString('base64');
}

/** Guest-physical addresses of pages whose hashes differ. */
export function differingPages(a: string, b: string): number[] {
  const x = Buffer.from(a, 'base64');
  const y = Buffer.from(b, 'base64');
  const out: number[] = [];
  for (let i = 0; i < Math.max(x.length, y.length); i += 8) if (x.compare(y, i, i + 8, i, i + 8) !== 0) out.push((i / 8) * PAGE);
  return out;
}
