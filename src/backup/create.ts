// Why this file exists: one backup of a running VM into a chunk store. The point in time is
// frozen by image fleecing (qemu/backup-ops.ts); the disks are read over QEMU's NBD export with
// Ferry's NBD client; every 64 KiB chunk the store lacks is written, and one manifest per disk
// (a chunk id per 64 KiB) is committed atomically with the backup's row.
//
// Incremental: a persistent dirty bitmap `ferry-bk-<id>` on each disk records what the guest
// wrote since backup <id>. When the store's newest backup of this VM is <id> and QEMU still has
// that bitmap, consistent, only its dirty chunks are read and the rest of the manifest is copied
// from backup <id>. Otherwise (bitmap lost: QEMU killed, VM migrated, backup pruned) every
// allocated chunk is read, and still only chunks the store lacks are written.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient, type Extent } from '../nbd/client.js';
import { BACKUP_BITMAP_PREFIX, diskBitmaps, fleeceStart, fleeceStop, removeBitmap, settleBitmaps } from '../qemu/backup-ops.js';
import type { QmpClient } from '../qemu/qmp.js';
import { topNodes } from '../qemu/snapshot-ops.js';
import { createBlank } from '../storage/qcow2.js';
import { STORE_CHUNK, ZERO_ID, type BackupDisk, type BackupRow, type ChunkStore } from '../store/store.js';
import type { VmSpec } from '../vm/spec.js';

export interface BackupProgress {
  phase: 'freezing' | 'reading' | 'committing' | 'done';
  doneBytes: number;
  totalBytes: number;
  newBytes: number;
  kind: 'full' | 'incremental';
}

export interface BackupResult extends BackupRow {
  chunksRead: number;
  chunksNew: number;
  /** why a full read happened although a previous backup exists */
  fullReason?: string;
}

export function newBackupId(now = new Date()): string {
  return `${now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}-${crypto.randomBytes(2).toString('hex')}`;
}

export async function createBackup(o: {
  qmp: QmpClient;
  spec: VmSpec;
  store: ChunkStore;
  /** a directory for the fleecing overlays (same file system as the disks is best) */
  tmpDir: string;
  nbdSocket: string;
  full?: boolean;
  onProgress?: (p: BackupProgress) => void;
}): Promise<BackupResult> {
  const { qmp, spec, store } = o;
  const t0 = Date.now();
  const id = newBackupId();
  const next = `${BACKUP_BITMAP_PREFIX}${id}`;
  // A backup interrupted by an agent crash may have left its fleecing nodes in QEMU, and files.
  await fleeceStop(qmp, spec.disks.length);
  const nodes = await topNodes(qmp, spec.disks.length);
  const last = store.backups(spec.name).pop();
  const lastDisks = last ? store.disks(last.id) : [];
  // Which disks can go incremental: the bitmap of the last backup is there and sound.
  const prev: (string | undefined)[] = [];
  let fullReason: string | undefined = o.full ? 'asked for (--full)' : last ? undefined : 'first backup of this VM in this store';
  for (let i = 0; i < spec.disks.length; i++) {
    const bms = (await diskBitmaps(qmp, nodes[i]!)).filter((b) => b.name.startsWith(BACKUP_BITMAP_PREFIX));
    const want = last ? `${BACKUP_BITMAP_PREFIX}${last.id}` : undefined;
    const b = bms.find((x) => x.name === want);
    for (const stale of bms) if (stale !== b || stale.inconsistent || o.full) await removeBitmap(qmp, nodes[i]!, stale.name);
    const usable = !o.full && b && !b.inconsistent && b.recording && lastDisks[i]?.size === spec.disks[i]!.sizeBytes;
    if (!usable && !fullReason) fullReason = !b ? `QEMU has no dirty bitmap for backup ${last!.id} (the VM was restarted after a crash, migrated, or the bitmap was removed)` : b.inconsistent ? 'the dirty bitmap is inconsistent (QEMU was killed)' : !b.recording ? 'the dirty bitmap was left frozen by an interrupted backup' : 'the disk changed size';
    prev.push(usable ? want : undefined);
  }
  const kind: 'full' | 'incremental' = prev.every((p) => p) && !fullReason ? 'incremental' : 'full';
  if (kind === 'full') prev.fill(undefined);

  o.onProgress?.({ phase: 'freezing', doneBytes: 0, totalBytes: 0, newBytes: 0, kind });
  fs.rmSync(o.tmpDir, { recursive: true, force: true });
  fs.mkdirSync(o.tmpDir, { recursive: true });
  const tmpFiles = spec.disks.map((_, i) => path.join(o.tmpDir, `fleece-${id}-${i}.qcow2`));
  let ok = false;
  const clients: NbdClient[] = [];
  try {
    for (const [i, f] of tmpFiles.entries()) await createBlank(f, spec.disks[i]!.sizeBytes);
    await fleeceStart(qmp, { nodes, tmpFiles, next, prev, nbdSocket: o.nbdSocket });
    // What to read on each disk.
    const plans: { client: NbdClient; chunks: number[]; zero: Set<number>; manifest: Buffer; size: number }[] = [];
    for (let i = 0; i < spec.disks.length; i++) {
      const p = prev[i];
      const client = await NbdClient.connect({ path: o.nbdSocket }, `bk${i}`, p ? ['base:allocation', `qemu:dirty-bitmap:${p}`] : ['base:allocation']);
      clients.push(client);
      const size = client.size;
      const n = Math.ceil(size / STORE_CHUNK);
      const alloc = await client.map('base:allocation');
      const zero = chunksWhere(alloc, (e) => (e.flags & 2) !== 0, n, true);
      let chunks: number[];
      let manifest: Buffer;
      if (p) {
        manifest = Buffer.from(lastDisks[i]!.manifest);
        chunks = [...chunksWhere(await client.map(`qemu:dirty-bitmap:${p}`), (e) => (e.flags & 1) !== 0, n, false)];
      } else {
        manifest = Buffer.alloc(n * 32);
        chunks = [...chunksWhere(alloc, (e) => (e.flags & 2) === 0, n, false)];
      }
      plans.push({ client, chunks: chunks.sort((a, b) => a - b), zero, manifest, size });
    }
    const total = plans.reduce((a, p) => a + p.chunks.length * STORE_CHUNK, 0);
    let done = 0;
    let newBytes = 0;
    let chunksNew = 0;
    let chunksRead = 0;
    let lastReport = 0;
    let tWait = 0;
    let tPut = 0;
    const sealer = store.sealer();
    const sealing: Promise<void>[] = [];
    try {
      for (const plan of plans) {
        const { client, chunks, zero, manifest, size } = plan;
        // Reads run 16 deep; chunks are named and sealed by worker threads, up to 64 in flight.
        const DEPTH = 16;
        const inflight: Promise<Buffer>[] = [];
        const read = (c: number) => {
          const off = c * STORE_CHUNK;
          const len = Math.min(STORE_CHUNK, size - off);
          return zero.has(c) ? Promise.resolve(Buffer.alloc(0)) : client.read(off, len);
        };
        for (let k = 0; k < Math.min(DEPTH, chunks.length); k++) inflight.push(read(chunks[k]!));
        for (let k = 0; k < chunks.length; k++) {
          const w0 = process.hrtime.bigint();
          const data = await inflight.shift()!;
          tWait += Number(process.hrtime.bigint() - w0);
          if (k + DEPTH < chunks.length) inflight.push(read(chunks[k + DEPTH]!));
          const c = chunks[k]!;
          chunksRead++;
          if (data.length === 0 || isZero(data)) ZERO_ID.copy(manifest, c * 32);
          else {
            // Naming and sealing run on worker threads while the next reads arrive.
            sealing.push(
              sealer.seal(data).then(({ id, sealed }) => {
                id.copy(manifest, c * 32);
                const w = store.putSealed(id, sealed, Math.min(STORE_CHUNK, size - c * STORE_CHUNK));
                if (w) {
                  newBytes += w;
                  chunksNew++;
                }
              }),
            );
            if (sealing.length >= 64) {
              const p0 = process.hrtime.bigint();
              await sealing.shift();
              tPut += Number(process.hrtime.bigint() - p0);
            }
          }
          done += STORE_CHUNK;
          if (o.onProgress && Date.now() - lastReport > 250) {
            lastReport = Date.now();
            o.onProgress({ phase: 'reading', doneBytes: done, totalBytes: total, newBytes, kind });
          }
        }
      }
      await Promise.all(sealing.splice(0));
    } finally {
      await Promise.allSettled(sealing);
      await sealer.close();
    }
    o.onProgress?.({ phase: 'committing', doneBytes: total, totalBytes: total, newBytes, kind });
    const disks: BackupDisk[] = plans.map((p, i) => ({ disk: i, size: p.size, manifest: p.manifest }));
    const row: BackupRow = { id, vm: spec.name, created: t0, kind, parent: kind === 'incremental' ? last!.id : null, spec: JSON.stringify(spec), bytesRead: chunksRead * STORE_CHUNK, bytesNew: newBytes, durationMs: 0 };
    row.durationMs = Date.now() - t0;
    const c0 = Date.now();
    await store.commit(row, disks);
    if (process.env.FERRY_DEBUG_BACKUP) console.error(`backup ${id}: read-wait ${Math.round(tWait / 1e6)} ms, store.put ${Math.round(tPut / 1e6)} ms, commit ${Date.now() - c0} ms, total ${Date.now() - t0} ms`);
    ok = true;
    o.onProgress?.({ phase: 'done', doneBytes: total, totalBytes: total, newBytes, kind });
    return { ...row, chunksRead, chunksNew, ...(fullReason && kind === 'full' ? { fullReason } : {}) };
  } finally {
    for (const c of clients) await c.close().catch(() => {});
    await fleeceStop(qmp, spec.disks.length);
    for (let i = 0; i < spec.disks.length; i++) await settleBitmaps(qmp, nodes[i]!, { ok, next, ...(prev[i] ? { prev: prev[i] } : {}) }).catch(() => {});
    fs.rmSync(o.tmpDir, { recursive: true, force: true });
    if (!ok) store.abandon();
  }
}

/** Chunk indexes touched by extents matching `pred` (all of the chunk when `whole`). */
function chunksWhere(ex: Extent[], pred: (e: Extent) => boolean, n: number, whole: boolean): Set<number> {
  const out = new Set<number>();
  for (const e of ex) {
    if (!pred(e)) continue;
    const first = whole ? Math.ceil(e.offset / STORE_CHUNK) : Math.floor(e.offset / STORE_CHUNK);
    const end = whole ? Math.floor((e.offset + e.length) / STORE_CHUNK) : Math.ceil((e.offset + e.length) / STORE_CHUNK);
    for (let c = first; c < Math.min(end, n); c++) out.add(c);
  }
  // A last partial chunk that is zero to the end of the disk counts as whole.
  return out;
}

const ZEROS = Buffer.alloc(STORE_CHUNK);
function isZero(b: Buffer): boolean {
  return b.compare(ZEROS, 0, b.length, 0, b.length) === 0;
}
