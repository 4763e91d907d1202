// Why this file exists: hashing guest RAM (ram-verify.ts) off the agent's main thread. A pool
// worker: each message {id, file, groups} (1 MiB group indexes) is answered with {id, hashes}.
import { parentPort } from 'node:worker_threads';
import { hashGroups, hashReady } from './ram-verify.js';

// Messages wait in the port until the listener is attached, i.e. until the hasher is ready.
await hashReady();
parentPort!.on('message', (m: { id: number; file: string; groups: number[] }) => {
  try {
    parentPort!.postMessage({ id: m.id, hashes: hashGroups(m.file, m.groups) });
  } catch (e) {
    parentPort!.postMessage({ id: m.id, error: (e as Error).message });
  }
});
