// Why this file exists: checking guest RAM end to end at the switchover, and repairing it.
// QEMU 7.2's RAM pre-copy under TCG has left guest pages stale at the destination although its
// stream arrived intact: its dirty tracking at the source misses guest writes (docs/benchmarks.md,
// "Known issue"). Guest RAM is a shared file
// (cmdline.ts), so with both guests paused the agents compare it in 1 MiB groups (hashed by
// ram-hash.ts): the source hashes its RAM from the pause on (it no longer changes; one thread
// until QEMU's last pages are out, source.ts), the destination once QEMU has
// loaded the stream, re-using the hashes it took during the pre-copy of groups the stream has not
// touched since (ram-track.ts). The destination asks for every group that differs, writes it into
// its guest's RAM, and checks again; only then does the VM run there.
import fs from 'node:fs';
import { hashSome, RAM_GROUP, RAM_HASH_BYTES } from './ram-hash.js';

const ZERO = Buffer.alloc(RAM_GROUP);

/** Fresh hashes of `groups` from memory, written into `hashes` at their places. */
export async function rehashInto(file: string, hashes: Buffer, groups: readonly number[]): Promise<void> {
  if (!groups.length) return;
  const h = await hashSome(file, groups);
  groups.forEach((g, i) => h.copy(hashes, g * RAM_HASH_BYTES, i * RAM_HASH_BYTES, (i + 1) * RAM_HASH_BYTES));
}

/** Indexes of groups whose hashes differ. */
export function differingGroups(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  const w = RAM_HASH_BYTES;
  for (let i = 0; i < Math.max(a.length, b.length); i += w) if (a.compare(b, i, i + w, i, i + w) !== 0) out.push(i / w);
  return out;
}

export function readGroup(file: string, g: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(RAM_GROUP);
    const n = fs.readSync(fd, b, 0, RAM_GROUP, g * RAM_GROUP);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

export function writeGroup(file: string, g: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, g * RAM_GROUP);
  } finally {
    fs.closeSync(fd);
  }
}

/** Fault injection: fills the last `n` all-zero groups of guest RAM with 0xa5 (free memory, so the guest does not mind). */
export function scribbleFreeRam(file: string, bytes: number, n: number): number[] {
  const done: number[] = [];
  for (let g = Math.floor(bytes / RAM_GROUP) - 1; g >= 0 && done.length < n; g--) {
    if (!readGroup(file, g).equals(ZERO)) continue;
    writeGroup(file, g, Buffer.alloc(RAM_GROUP, 0xa5));
    done.push(g);
  }
  return done;
}
