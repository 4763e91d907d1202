// Why this file exists: hashing guest RAM for its check at the switchover (ram-verify.ts), on two
// threads, at a pace the caller can change while it runs. The source hashes all guest RAM in the
// pause, which competes for the cores with what the pause waits for (QEMU's last pages); the
// caller says how many threads may hash at each moment (`RamHashJob.width`), and the threads
// obey between two 1 MiB groups without a message to this thread: the groups are taken one at a
// time from a counter both threads share, and a thread over the width sleeps on the counter's
// neighbour (Atomics). Measured on wan-10 before this: one message per 8 MiB batch left the
// threads idle while the agent's event loop was busy in the pause.
//
// The hash is XXH128 (hash-wasm), not SHA-256: the destination's hashing is part of the pause,
// and XXH128 runs 5.3 GiB/s per thread here against SHA-256's 1.3 (measured, 1 MiB buffers). It
// guards against QEMU and transport faults between two trusted agents on an authenticated link,
// not against an adversary, and 128 bits make an accidental match of a differing MiB negligible.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { createXXHash128, type IHasher } from 'hash-wasm';

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

/** One job's work as each thread sees it (all buffers shared). */
export interface HashTask {
  file: string;
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
  const buf = Buffer.alloc(RAM_GROUP);
  const fd = fs.openSync(t.file, 'r');
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
      const got = fs.readSync(fd, buf, 0, RAM_GROUP, t.groups[i]! * RAM_GROUP);
      const b = buf.subarray(0, got);
      // Much of a guest's RAM is zero: memcmp is faster still.
      const zero = got === RAM_GROUP && b.equals(ZERO);
      if (zero) Atomics.add(t.control, ZEROS, 1);
      (zero ? zeroHash! : digest(b)).copy(t.out, i * RAM_HASH_BYTES);
    }
  } finally {
    fs.closeSync(fd);
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
    this.task = { file, groups: [...groups], control, out };
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
