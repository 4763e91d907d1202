// Why this file exists: naming and sealing chunks (SHA-256/HMAC, zstd, AES-GCM) is the CPU half
// of a backup; a pool of worker threads (seal-worker.ts) does it so that reading the disk over
// NBD on the main thread overlaps with it. The store writes what comes back (putSealed).
import { Worker } from 'node:worker_threads';
import type { StoreKey } from './chunk-file.js';

/** Worker threads that name and seal chunks; results come back in submission order. */
export class Sealer {
  private readonly workers: Worker[];
  private next = 0;
  private seq = 0;
  private readonly waiting = new Map<number, { resolve: (r: { id: Buffer; sealed: Buffer }) => void; reject: (e: Error) => void }>();

  constructor(key: StoreKey | undefined, threads: number) {
    this.workers = Array.from({ length: threads }, () => {
      const w = new Worker(new URL('./seal-worker.js', import.meta.url), { workerData: { key } });
      w.on('message', (m: { n: number; id: Uint8Array; sealed: Uint8Array }) => {
        const p = this.waiting.get(m.n);
        this.waiting.delete(m.n);
        p?.resolve({ id: Buffer.from(m.id.buffer, m.id.byteOffset, m.id.byteLength), sealed: Buffer.from(m.sealed.buffer, m.sealed.byteOffset, m.sealed.byteLength) });
      });
      w.on('error', (e) => {
        for (const p of this.waiting.values()) p.reject(e);
        this.waiting.clear();
      });
      return w;
    });
  }

  /** Names and seals `plain` (which is handed over: do not use it afterwards). */
  seal(plain: Buffer): Promise<{ id: Buffer; sealed: Buffer }> {
    const n = this.seq++;
    const w = this.workers[this.next++ % this.workers.length]!;
    return new Promise((resolve, reject) => {
      this.waiting.set(n, { resolve, reject });
      const own = plain.byteOffset === 0 && plain.byteLength === plain.buffer.byteLength ? plain : Buffer.from(plain);
      w.postMessage({ n, plain: own }, [own.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
