// Why this file exists: checking guest RAM end to end at the switchover, and repairing it.
// QEMU 7.2's RAM pre-copy under TCG has left guest pages stale at the destination although its
// stream arrived intact (docs/benchmarks.md, "Known issue"). Guest RAM is a shared file
// (cmdline.ts), so with both guests paused the agents compare it in 1 MiB groups: the source
// hashes its RAM the moment QEMU pauses the guest (it no longer changes), the destination once
// QEMU has loaded the stream. The destination asks for every group that differs, writes it into
// its guest's RAM, and checks again; only then does the VM run there.
//
// The hash is XXH128 (hash-wasm), not SHA-256: the destination's hashing is part of the pause,
// and XXH128 runs 5.3 GiB/s per thread here against SHA-256's 1.3 (measured, 1 MiB buffers). It
// guards against QEMU and transport faults between two trusted agents on an authenticated link,
// not against an adversary, and 128 bits make an accidental match of a differing MiB negligible.
// Disks, which outlive the switchover, keep SHA-256 (blocks.ts).
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { createXXHash128, type IHasher } from 'hash-wasm';

export const RAM_GROUP = 1 << 20;
/** the group hash's name in `ram-end` (protocol.ts) and its length */
export const RAM_HASH = 'xxh128';
export const RAM_HASH_BYTES = 16;

const ZERO = Buffer.alloc(RAM_GROUP);
let hasher: IHasher | undefined;
let zeroHash: Buffer | undefined;

/** Instantiates this thread's hasher (WebAssembly: asynchronous, once). */
export async function hashReady(): Promise<void> {
  if (hasher) return;
  hasher = await createXXHash128();
  zeroHash = digest(ZERO);
}

function digest(b: Buffer): Buffer {
  hasher!.init();
  hasher!.update(b);
  return Buffer.from(hasher!.digest('binary'));
}

/** Hashes of groups [from, to) of a guest-RAM file, concatenated (what each worker runs). */
export function hashGroups(file: string, from: number, to: number): Buffer {
  if (!hasher) throw new Error('hashReady() was not awaited');
  const out = Buffer.alloc((to - from) * RAM_HASH_BYTES);
  const buf = Buffer.alloc(RAM_GROUP);
  const fd = fs.openSync(file, 'r');
  try {
    for (let g = from; g < to; g++) {
      const n = fs.readSync(fd, buf, 0, RAM_GROUP, g * RAM_GROUP);
      const b = buf.subarray(0, n);
      // Most of a guest's RAM is zero: memcmp is faster still.
      (n === RAM_GROUP && b.equals(ZERO) ? zeroHash! : digest(b)).copy(out, (g - from) * RAM_HASH_BYTES);
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

const WORKER = new URL('./ram-hash-worker.js', import.meta.url);
/** Two hashing threads, started once and kept (unref'd) so a switchover never waits for one. */
let pool: Worker[] | undefined;
let nextId = 1;
const waiting = new Map<number, { resolve: (b: Buffer) => void; reject: (e: Error) => void }>();

function workers(): Worker[] {
  if (!pool && fs.existsSync(fileURLToPath(WORKER))) {
    pool = Array.from({ length: 2 }, () => {
      const w = new Worker(WORKER);
      w.on('message', (m: { id: number; hashes?: Uint8Array; error?: string }) => {
        const p = waiting.get(m.id);
        waiting.delete(m.id);
        if (m.hashes) p?.resolve(Buffer.from(m.hashes.buffer, m.hashes.byteOffset, m.hashes.byteLength));
        else p?.reject(new Error(`hashing guest RAM: ${m.error}`));
      });
      w.on('error', (e) => {
        pool = undefined;
        for (const p of waiting.values()) p.reject(e);
        waiting.clear();
      });
      w.unref();
      return w;
    });
  }
  return pool ?? [];
}

/** Starts the hashing threads ahead of need (a migration's RAM phase calls this). */
export function warmUp(): void {
  workers();
}

/** The hash of every 1 MiB group of guest RAM [0, bytes), concatenated (on the pool's threads). */
export async function hashRam(file: string, bytes: number): Promise<Buffer> {
  const groups = Math.ceil(bytes / RAM_GROUP);
  const ws = workers();
  if (!ws.length) {
    await hashReady(); // running from sources (unit tests): this thread hashes
    return hashGroups(file, 0, groups);
  }
  const per = Math.ceil(groups / ws.length);
  const parts = await Promise.all(
    ws.map((w, i) => {
      const from = Math.min(groups, i * per);
      const to = Math.min(groups, from + per);
      if (from >= to) return Promise.resolve(Buffer.alloc(0));
      const id = nextId++;
      return new Promise<Buffer>((resolve, reject) => {
        waiting.set(id, { resolve, reject });
        w.postMessage({ id, file, from, to });
      });
    }),
  );
  return Buffer.concat(parts);
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
