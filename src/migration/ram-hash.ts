// Why this file exists: hashing guest RAM for its check at the switchover (ram-verify.ts), on two
// threads, at a pace the caller can change while it runs. The source hashes all guest RAM in the
// pause, which competes for the cores with what the pause waits for (QEMU's last pages); the
// caller says how many threads may hash at each moment (`RamHashJob.width`), and the threads
// obey between two 1 MiB groups without a message to this thread: the groups are taken one at a
// time from a counter both threads share, and a thread over the width sleeps on the counter's
// neighbour (Atomics). Measured on wan-10 before this: one message per 8 MiB batch left the
// threads idle while the agent's event loop was busy in the pause.
//
// The hash is XXH128 (XXH3, 128 bits), not SHA-256: the destination's hashing is part of the
// pause, and XXH128 runs 5.3 GiB/s per thread here in WebAssembly against SHA-256's 1.3 (measured,
// 1 MiB buffers). It guards against QEMU and transport faults between two trusted agents on an
// authenticated link, not against an adversary, and 128 bits make an accidental match of a
// differing MiB negligible.
//
// Where Ferry's addon built (native/ramhash.c), the RAM file is mapped once (`mapFor`, kept until
// `releaseRam`) and each group is checked and hashed where it lies: 13–15 ms per 256 MiB of a core
// once its pages are mapped, against ~95 ms for read(2) into a buffer and hash-wasm (half of that
// the copy). Both give the same hash; FERRY_NATIVE=0 uses the second (for comparisons).
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { createXXHash128, type IHasher } from 'hash-wasm';
import { nativeAddon } from '../util/native.js';

export const RAM_GROUP = 1 << 20;
/** the group hash's name in `ram-end` (protocol.ts) and its length */
export const RAM_HASH = 'xxh128';
export const RAM_HASH_BYTES = 16;

/** The shared control words of one job: how many threads may hash, the next group's index, zero groups seen. */
const WIDTH = 0;
const NEXT = 1;
const ZEROS = 2;
/** A thread held longer than this hashes anyway: a caller that never releases it must not stop hashing for good. */
const MAX_HOLD_MS = 10_000;

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

/** Guest RAM files mapped for hashing (main thread), by path; a file replaced since is mapped again. */
const maps = new Map<string, { id: number; ino: number; size: number }>();

/** The mapping of `file` for the addon (made on first use), or undefined without the addon. */
function mapFor(file: string): number | undefined {
  const n = nativeAddon();
  if (!n) return undefined;
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch {
    return undefined;
  }
  const have = maps.get(file);
  if (have && have.ino === st.ino && have.size === st.size) return have.id;
  releaseRam(file);
  if (st.size <= 0) return undefined;
  const fd = fs.openSync(file, 'r');
  try {
    const id = n.map(fd, st.size);
    maps.set(file, { id, ino: st.ino, size: st.size });
    return id;
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Unmaps a guest RAM file mapped for hashing: a migration's end on either side (the mapping
 * would keep the pages of a deleted file). A hash job still running in it fails.
 */
export function releaseRam(file: string): void {
  const have = maps.get(file);
  if (!have) return;
  maps.delete(file);
  nativeAddon()?.unmap(have.id);
}

/** One job's work as each thread sees it (all buffers shared). */
export interface HashTask {
  file: string;
  /** the addon's mapping of `file`, when the main thread has one */
  map?: number;
  groups: readonly number[];
  control: Int32Array;
  /** the hash of groups[i] at i × RAM_HASH_BYTES */
  out: Uint8Array;
}

/**
 * Hashes groups of `t` until none is left, as thread `slot` (0 or 1) of the job: before each
 * group it waits while the job's width is not above `slot`. With `budget`, returns after that
 * many groups or at once when held instead of waiting ('more'); 'done' when no group is left.
 */
export function runTask(t: HashTask, slot: number, budget = Infinity): 'done' | 'more' {
  if (!hasher) throw new Error('hashReady() was not awaited');
  const nat = t.map !== undefined ? nativeAddon() : null;
  const buf = nat ? undefined : Buffer.alloc(RAM_GROUP);
  const fd = nat ? -1 : fs.openSync(t.file, 'r');
  try {
    for (let n = 0; ; n++) {
      let w: number;
      const heldSince = Date.now();
      // Held while over the width, unless no group is left to take.
      while (slot >= (w = Atomics.load(t.control, WIDTH)) && Atomics.load(t.control, NEXT) < t.groups.length && Date.now() - heldSince < MAX_HOLD_MS) {
        if (budget !== Infinity) return 'more';
        Atomics.wait(t.control, WIDTH, w, MAX_HOLD_MS);
      }
      if (n >= budget) return 'more';
      const i = Atomics.add(t.control, NEXT, 1);
      if (i >= t.groups.length) {
        Atomics.notify(t.control, WIDTH); // a thread held over the width has nothing left to wait for
        return 'done';
      }
      if (nat) {
        if (nat.hashGroup(t.map!, t.groups[i]! * RAM_GROUP, RAM_GROUP, t.out, i * RAM_HASH_BYTES)) {
          Atomics.add(t.control, ZEROS, 1);
          zeroHash!.copy(t.out, i * RAM_HASH_BYTES);
        }
        continue;
      }
      const got = fs.readSync(fd, buf!, 0, RAM_GROUP, t.groups[i]! * RAM_GROUP);
      const b = buf!.subarray(0, got);
      // Much of a guest's RAM is zero: memcmp is faster still.
      const zero = got === RAM_GROUP && b.equals(ZERO);
      if (zero) Atomics.add(t.control, ZEROS, 1);
      (zero ? zeroHash! : digest(b)).copy(t.out, i * RAM_HASH_BYTES);
    }
  } finally {
    if (fd >= 0) fs.closeSync(fd);
  }
}

const WORKER = new URL('./ram-hash-worker.js', import.meta.url);
/** Two hashing threads, started once and kept (unref'd) so a switchover never waits for one. */
let pool: Worker[] | undefined;
let nextId = 1;
const waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();

function workers(): Worker[] {
  if (!pool && fs.existsSync(fileURLToPath(WORKER))) {
    pool = Array.from({ length: 2 }, () => {
      const w = new Worker(WORKER);
      w.on('message', (m: { id: number; error?: string }) => {
        const p = waiting.get(m.id);
        waiting.delete(m.id);
        if (m.error === undefined) p?.resolve();
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

/**
 * The hashes of a list of groups, computed on the pool's threads at the width the caller sets
 * (`width(n)`: how many threads may hash from now on; 0 holds them between two groups). A held
 * job keeps the pool's threads: another job waits behind it (10 s at most, MAX_HOLD_MS).
 */
export class RamHashJob {
  /** the hashes of the groups, concatenated in their order, once all are hashed */
  readonly done: Promise<Buffer>;
  private readonly task: HashTask;
  private cancelled = false;

  constructor(file: string, groups: readonly number[]) {
    const control = new Int32Array(new SharedArrayBuffer(3 * 4));
    const out = new Uint8Array(new SharedArrayBuffer(Math.max(1, groups.length * RAM_HASH_BYTES)));
    const map = groups.length ? mapFor(file) : undefined;
    this.task = { file, groups: [...groups], control, out, ...(map !== undefined ? { map } : {}) };
    const ws = groups.length ? workers() : [];
    const ran = !groups.length ? [] : ws.length ? ws.map((w, slot) => this.post(w, slot)) : [this.inThisThread()];
    this.done = Promise.all(ran).then(() => {
      if (this.cancelled) throw new Error('hashing guest RAM: cancelled');
      return Buffer.from(out.buffer, 0, groups.length * RAM_HASH_BYTES);
    });
    this.done.catch(() => {}); // a caller that abandons the job must not leave a rejection unhandled
  }

  /** Lets up to `n` threads hash from now on (0: hold them after the groups in progress). */
  width(n: number): void {
    Atomics.store(this.task.control, WIDTH, n);
    Atomics.notify(this.task.control, WIDTH);
  }

  /** Stops the job: the threads take no further group, and `done` rejects. */
  cancel(): void {
    this.cancelled = true;
    Atomics.store(this.task.control, NEXT, this.task.groups.length);
    this.width(2);
  }

  [Symbol.dispose](): void {
    this.cancel();
  }

  /** Groups not yet taken by a thread. */
  get remaining(): number {
    return Math.max(0, this.task.groups.length - Atomics.load(this.task.control, NEXT));
  }

  /** Groups found all zero so far. */
  get zeroGroups(): number {
    return Atomics.load(this.task.control, ZEROS);
  }

  private post(w: Worker, slot: number): Promise<void> {
    const id = nextId++;
    return new Promise<void>((resolve, reject) => {
      waiting.set(id, { resolve, reject });
      w.postMessage({ id, slot, task: this.task });
    });
  }

  /** Without threads (running from sources: unit tests) this thread hashes, a few groups per turn. */
  private async inThisThread(): Promise<void> {
    await hashReady();
    while (runTask(this.task, 0, 4) === 'more') await new Promise((r) => setTimeout(r, Atomics.load(this.task.control, WIDTH) > 0 ? 0 : 5));
  }
}

/**
 * Maps guest RAM for the addon ahead of need and has its pages mapped once (one thread hashes it
 * all, ~35 ms per 256 MiB here): a switchover's hash then runs at its warm speed. Cancel the
 * returned job if the pause comes first. Undefined without the addon (nothing to prepare).
 */
export function prepareRam(file: string, bytes: number): RamHashJob | undefined {
  if (!nativeAddon() || !fs.existsSync(file)) return undefined;
  const job = new RamHashJob(file, allGroups(bytes));
  job.width(1);
  return job;
}

/** The hashes of the listed groups, concatenated in their order (on the pool's threads). */
export function hashSome(file: string, groups: readonly number[]): Promise<Buffer> {
  const job = new RamHashJob(file, groups);
  job.width(2);
  return job.done;
}

/** Every 1 MiB group of `bytes` of guest RAM, in order. */
export function allGroups(bytes: number): number[] {
  return Array.from({ length: ramGroups(bytes) }, (_, g) => g);
}

/** The hash of every 1 MiB group of guest RAM [0, bytes), concatenated (on the pool's threads). */
export function hashRam(file: string, bytes: number): Promise<Buffer> {
  return hashSome(file, allGroups(bytes));
}
