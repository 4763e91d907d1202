// Why this file exists: the CPU half of a backup — naming (SHA-256/HMAC), compressing and
// encrypting chunks — on worker threads, so that reading a disk over NBD on the main thread
// overlaps with it (sealer.ts). A chunk the store's index already holds is named only: each
// worker reads the index (SQLite, read-only) itself.
//
// Messages: in {n, run} (a run of adjacent chunks, transferred); out {n, ids, stored, sealed}
// (chunk-file.ts sealRun); on error {n, error: {code, message}}. Once loaded: {ready: true}.
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import Database from 'better-sqlite3';
import { FerryError } from '../errors.js';
import { sealRun, type StoreKey } from './chunk-file.js';

const { dir, key, chunk } = workerData as { dir: string; key?: StoreKey; chunk: number };
const k: StoreKey | undefined = key ? { enc: Buffer.from(key.enc), mac: Buffer.from(key.mac), check: key.check } : undefined;
const db = new Database(path.join(dir, 'index.db'), { readonly: true, fileMustExist: true });
const q = db.prepare('SELECT 1 FROM chunks WHERE id = ?');
const held = (id: Buffer) => q.get(id) !== undefined;

parentPort!.on('message', (m: { n: number; run: Uint8Array }) => {
  try {
    const r = sealRun(k, chunk, Buffer.from(m.run.buffer, m.run.byteOffset, m.run.byteLength), held);
    const sealed = r.sealed.byteOffset === 0 && r.sealed.byteLength === r.sealed.buffer.byteLength ? r.sealed : Buffer.from(r.sealed);
    parentPort!.postMessage({ n: m.n, ids: r.ids, stored: r.stored, sealed }, [r.ids.buffer as ArrayBuffer, r.stored.buffer as ArrayBuffer, sealed.buffer as ArrayBuffer]);
  } catch (e) {
    parentPort!.postMessage({ n: m.n, error: { code: e instanceof FerryError ? e.code : 'INTERNAL', message: (e as Error).message } });
  }
});
parentPort!.postMessage({ ready: true });
