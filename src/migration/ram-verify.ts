// Why this file exists: checking guest RAM end to end at the switchover, and repairing it.
// QEMU 7.2's RAM pre-copy under TCG has left guest pages stale at the destination although its
// stream arrived intact: its dirty tracking at the source misses guest writes (docs/benchmarks.md,
// "Known issue"). Guest RAM is a shared file
// (cmdline.ts), so with both guests paused the agents compare it in 1 MiB groups: the source
// hashes its RAM once QEMU's stream ended (it no longer changes), the destination once QEMU has
// loaded the stream, re-using the hashes it took during the pre-copy of groups the stream has not
// touched since (ram-track.ts). The destination asks for every group that differs, writes it into
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

/** Hashes of the given groups of a guest-RAM file, concatenated in order (what each worker runs). */
export function hashGroups(file: string, groups: readonly number[]): Buffer {
  if (!hasher) throw new Error('hashReady() was not awaited');
  const out = Buffer.alloc(groups.length * RAM_HASH_BYTES);
  const buf = Buffer.alloc(RAM_GROUP);
  const fd = fs.openSync(file, 'r');
  try {
    for (let i = 0; i < groups.length; i++) {
      const n = fs.readSync(fd, buf, 0, RAM_GROUP, groups[i]! * RAM_GROUP);
      const b = buf.subarray(0, n);
      // Most of a guest's RAM is zero: memcmp is faster still.
      (n === RAM_GROUP && b.equals(ZERO) ? zeroHash! : digest(b)).copy(out, i * RAM_HASH_BYTES);
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

/** The number of 1 MiB groups of `bytes` of guest RAM. */
export function ramGroups(bytes: number): number {
  return Math.ceil(bytes / RAM_GROUP);
}

/** The hash of every 1 MiB group of guest RAM [0, bytes), concatenated (on the pool's threads). */
export function hashRam(file: string, bytes: number): Promise<Buffer> {
  return hashSome(file, Array.from({ length: ramGroups(bytes) }, (_, g) => g));
}

/** The hashes of the listed groups, concatenated in their order (on the pool's threads). */
export async function hashSome(file: string, groups: readonly number[]): Promise<Buffer> {
  const ws = workers();
  if (!ws.length) {
    await hashReady(); // running from sources (unit tests): this thread hashes
    return hashGroups(file, groups);
  }
  const per = Math.ceil(groups.length / ws.length);
  const parts = await Promise.all(
    ws.map((w, i) => {
      const part = groups.slice(i * per, (i + 1) * per);
      if (!part.length) return Promise.resolve(Buffer.alloc(0));
      const id = nextId++;
      return new Promise<Buffer>((resolve, reject) => {
        waiting.set(id, { resolve, reject });
        w.postMessage({ id, file, groups: part });
      });
    }),
  );
  return Buffer.concat(parts);
}

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
