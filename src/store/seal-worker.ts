// Why this file exists: the CPU half of writing chunks — naming (SHA-256/HMAC), compressing and
// encrypting — on worker threads, so that reading a disk over NBD and sealing its chunks overlap
// (store.ts Sealer). Messages: {n, plain} in, {n, id, sealed} out; buffers are transferred.
import { parentPort, workerData } from 'node:worker_threads';
import { chunkId, seal, type StoreKey } from './chunk-file.js';

const key = (workerData as { key?: StoreKey }).key;
const fix = (k: StoreKey | undefined): StoreKey | undefined => (k ? { enc: Buffer.from(k.enc), mac: Buffer.from(k.mac), check: k.check } : undefined);
const k = fix(key);
parentPort!.on('message', (m: { n: number; plain: Uint8Array }) => {
  const plain = Buffer.from(m.plain.buffer, m.plain.byteOffset, m.plain.byteLength);
  const id = chunkId(plain, k);
  const sealed = seal(plain, k);
  parentPort!.postMessage({ n: m.n, id, sealed }, [sealed.buffer as ArrayBuffer]);
});
