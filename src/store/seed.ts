// Why this file exists: seeding a migration from a chunk store. A destination host that holds a
// backup of the incoming VM (say, last night's) tells the source which 64 KiB blocks it already
// has — the chunks of that VM's newest backup — and any disk block with that content crosses the
// WAN as a 32-byte reference. Chunk ids of an unencrypted store are SHA-256 of the plain 64 KiB,
// exactly the names the transport's dedup uses. (An encrypted store names chunks by keyed HMAC,
// so it cannot seed: nothing about its content is visible without the key.)
import fs from 'node:fs';
import path from 'node:path';
import type { ChunkIndex } from '../storage/chunk-index.js';
import { distinctIds, openStore } from './store.js';

/** The newest backup of `vm` (by name or uuid) in the store at `dir`, as a chunk index; or none. */
export function backupSeed(dir: string, vm: { name: string; uuid: string }): ChunkIndex | undefined {
  if (!fs.existsSync(path.join(dir, 'ferry-store.json'))) return undefined;
  const store = openStore(dir);
  try {
    if (store.encrypted) {
      store.close();
      return undefined;
    }
    const mine = store.backups().filter((b) => b.vm === vm.name || (JSON.parse(b.spec) as { uuid?: string }).uuid === vm.uuid);
    const last = mine.pop();
    if (!last) {
      store.close();
      return undefined;
    }
    const ids = distinctIds(store.disks(last.id).map((d) => d.manifest));
    return {
      template: `store:${dir}#${last.id}`,
      chunks: ids.length,
      hashes: () => ids,
      read: (h) => store.readIfPresent(h),
      close: () => store.close(),
    };
  } catch {
    store.close();
    return undefined;
  }
}
