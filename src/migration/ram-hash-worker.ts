// Why this file exists: hashing guest RAM (ram-hash.ts) off the agent's main thread. A pool
// worker: each message {id, slot, task} runs the task as thread `slot` until no group is left
// and is answered with {id} (or {id, error}); the hashes are in the task's shared buffer.
import { parentPort } from 'node:worker_threads';
import { hashReady, runTask, type HashTask } from './ram-hash.js';

// Messages wait in the port until the listener is attached, i.e. until the hasher is ready.
await hashReady();
parentPort!.on('message', (m: { id: number; slot: number; task: HashTask }) => {
  try {
    runTask(m.task, m.slot);
    parentPort!.postMessage({ id: m.id });
  } catch (e) {
    parentPort!.postMessage({ id: m.id, error: (e as Error).message });
  }
});
