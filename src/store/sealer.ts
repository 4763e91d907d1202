// Why this file exists: naming and sealing chunks (SHA-256/HMAC, zstd, AES-GCM) is most of a
// backup's CPU; a pool of worker threads (seal-worker.ts) does it so that the main thread only
// reads the disk over NBD and appends what comes back to the backup's pack (ChunkStore.adopt).
// A chunk is in the index only after the backup commits.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { FerryError, type ErrorCode } from '../errors.js';
import { sealRun, type StoreKey } from './chunk-file.js';

export interface RunResult {
  /** 32 bytes per chunk; zeroes for an all-zero chunk */
  ids: Buffer;
  /** each chunk's sealed size in `sealed`; 0: the store holds it (or an earlier chunk of the run is the same); -1: all zero */
  stored: Int32Array;
  /** the sealed chunks with stored > 0, back to back in chunk order */
  sealed: Buffer;
}

type Reply = { n: number; ids: Uint8Array; stored: Int32Array; sealed: Uint8Array } | { n: number; error: { code: string; message: string } };

/** Worker threads that name and seal chunks for one store directory. */
export class Sealer {
  private readonly workers: Worker[];
  private next = 0;
  private up = 0;
  private idleUnref = false;
  /** a worker died: this pool is not reused */
  broken = false;
  /** called once every worker has loaded (for timing) */
  onReady?: () => void;
  private seq = 0;
  private readonly waiting = new Map<number, { resolve: (r: RunResult) => void; reject: (e: Error) => void }>();

  constructor(
    dir: string,
    private readonly key: StoreKey | undefined,
    private readonly chunk: number,
    threads: number,
    /** for runs stored on this thread: whether the store holds a chunk */
    private readonly held: (id: Buffer) => boolean,
  ) {
    // Where the compiled worker is missing (unit tests run the TypeScript sources), runs are
    // stored on this thread instead.
    const file = new URL('./seal-worker.js', import.meta.url);
    if (!fs.existsSync(fileURLToPath(file))) threads = 0;
    this.workers = Array.from({ length: threads }, () => {
      const w = new Worker(file, { workerData: { dir, key, chunk } });
      w.on('message', (m: Reply | { ready: true }) => {
        if ('ready' in m) {
          if (++this.up === this.workers.length) this.onReady?.();
          return;
        }
        const p = this.waiting.get(m.n);
        this.waiting.delete(m.n);
        if (this.idleUnref && !this.waiting.size) for (const x of this.workers) x.unref();
        if ('error' in m) p?.reject(new FerryError(m.error.code as ErrorCode, m.error.message));
        else p?.resolve({ ids: Buffer.from(m.ids.buffer, m.ids.byteOffset, m.ids.byteLength), stored: m.stored, sealed: Buffer.from(m.sealed.buffer, m.sealed.byteOffset, m.sealed.byteLength) });
      });
      w.on('error', (e) => {
        this.broken = true;
        for (const p of this.waiting.values()) p.reject(e);
        this.waiting.clear();
      });
      return w;
    });
  }

  /** Names and seals the chunks of `run` (handed over: do not use it afterwards). */
  sealRun(run: Buffer): Promise<RunResult> {
    if (!this.workers.length) {
      try {
        return Promise.resolve(sealRun(this.key, this.chunk, run, this.held));
      } catch (e) {
        return Promise.reject(e as Error);
      }
    }
    const n = this.seq++;
    const w = this.workers[this.next++ % this.workers.length]!;
    w.ref(); // work in flight keeps the process alive; an idle pool does not
    return new Promise((resolve, reject) => {
      this.waiting.set(n, { resolve, reject });
      const own = run.byteOffset === 0 && run.byteLength === run.buffer.byteLength ? run : Buffer.from(run);
      w.postMessage({ n, run: own }, [own.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  get threaded(): boolean {
    return this.workers.length > 0;
  }

  /** Workers stay loaded between backups without keeping the process alive. */
  unref(): void {
    this.idleUnref = true;
    if (!this.waiting.size) for (const w of this.workers) w.unref();
  }
}

/**
 * Warm pools, one per store directory and key: a worker takes ~100 ms to load, as long as a
 * small incremental backup takes to read. A pool idle for IDLE_MS is closed.
 */
const pools = new Map<string, { sealer: Sealer; timer?: NodeJS.Timeout }>();
const IDLE_MS = 300_000;

export function pooledSealer(storeId: string, dir: string, key: StoreKey | undefined, chunk: number, threads: number, held: (id: Buffer) => boolean): { sealer: Sealer; release: () => void } {
  // storeId tells a store from one made again at the same path (the workers read its index).
  const k = `${storeId}\0${key?.check ?? ''}\0${chunk}\0${threads}`;
  let p = pools.get(k);
  if (!p) {
    const sealer = new Sealer(dir, key, chunk, threads, held);
    // Without worker threads (unit tests) the sealer uses this store's index: not pooled.
    if (!sealer.threaded) return { sealer, release: () => void sealer.close() };
    p = { sealer };
    p.sealer.unref();
    pools.set(k, p);
  }
  const entry = p;
  clearTimeout(entry.timer);
  pools.delete(k); // in use: a second writer of the same store (not possible under its lock) would get its own
  return {
    sealer: entry.sealer,
    release: () => {
      if (pools.has(k) || entry.sealer.broken) return void entry.sealer.close();
      entry.timer = setTimeout(() => {
        pools.delete(k);
        void entry.sealer.close();
      }, IDLE_MS).unref();
      pools.set(k, entry);
    },
  };
}
