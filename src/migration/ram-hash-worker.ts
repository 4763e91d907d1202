// Why this file exists: hashing guest RAM (ram-verify.ts) off the agent's main thread. A pool
// worker: each message {id, file, from, to} (1 MiB group indexes) is answered with {id, hashes}
// (the groups' SHA-256, concatenated).
import crypto from 'node:crypto';
import fs from 'node:fs';
import { parentPort } from 'node:worker_threads';

const GROUP = 1 << 20;
const ZERO = Buffer.alloc(GROUP);
const ZERO_HASH = crypto.createHash('sha256').update(ZERO).digest();
const buf = Buffer.alloc(GROUP);

parentPort!.on('message', (m: { id: number; file: string; from: number; to: number }) => {
  try {
    const out = Buffer.alloc((m.to - m.from) * 32);
    const fd = fs.openSync(m.file, 'r');
    try {
      for (let g = m.from; g < m.to; g++) {
        const n = fs.readSync(fd, buf, 0, GROUP, g * GROUP);
        const b = buf.subarray(0, n);
        // Most of a guest's RAM is zero: memcmp is ten times faster than hashing.
        (n === GROUP && b.equals(ZERO) ? ZERO_HASH : crypto.createHash('sha256').update(b).digest()).copy(out, (g - m.from) * 32);
      }
    } finally {
      fs.closeSync(fd);
    }
    parentPort!.postMessage({ id: m.id, hashes: out });
  } catch (e) {
    parentPort!.postMessage({ id: m.id, error: (e as Error).message });
  }
});
