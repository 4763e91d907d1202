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
import { BACKUP_BITMAP_PREFIX, backupState, fleeceStart, fleeceStop, removeBitmap, settleBitmaps } from '../qemu/backup-ops.js';
import type { QmpClient } from '../qemu/qmp.js';
import { topNodes } from '../qemu/snapshot-ops.js';
import { createBlank } from '../storage/qcow2.js';
import type { Sealer } from '../store/sealer.js';
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

export interface BackupOptions {
  qmp: QmpClient;
  spec: VmSpec;
  store: ChunkStore;
  /** a directory for the fleecing overlays (same file system as the disks is best) */
  tmpDir: string;
  nbdSocket: string;
  full?: boolean;
  onProgress?: (p: BackupProgress) => void;
}

/** FERRY_DEBUG_BACKUP=1: where a backup's time goes, on the agent's stderr. */
class Timing {
  readonly t0 = Date.now();
  private readonly marks: string[] = [];
  /** ns waiting for NBD reads, and for the sealing workers */
  waitRead = 0;
  waitSeal = 0;
  mark(what: string): void {
    if (process.env.FERRY_DEBUG_BACKUP) this.marks.push(`${what} ${Date.now() - this.t0}`);
  }
  print(id: string): void {
    if (this.marks.length) console.error(`backup ${id} (ms since start): ${this.marks.join(', ')}; waited for reads ${Math.round(this.waitRead / 1e6)}, for sealing ${Math.round(this.waitSeal / 1e6)}`);
  }
}

export async function createBackup(o: BackupOptions): Promise<BackupResult> {
  const tm = new Timing();
  const id = newBackupId();
  // The worker threads start now, while QEMU is being set up.
  const { sealer, release } = o.store.sealer();
  sealer.onReady = () => tm.mark('workers up');
  try {
    return await backupWith(o, sealer, id, tm);
  } finally {
    release();
    tm.mark('released');
    tm.print(id);
  }
}

async function backupWith(o: BackupOptions, sealer: Sealer, id: string, tm: Timing): Promise<BackupResult> {
  const { qmp, spec, store } = o;
  const t0 = tm.t0;
  const mark = (what: string) => tm.mark(what);
  const next = `${BACKUP_BITMAP_PREFIX}${id}`;
  let nodes = await topNodes(qmp, spec.disks.length);
  // A backup interrupted by an agent crash may have left its fleecing nodes in QEMU (then the
  // top nodes were its filters), and files.
  let state = await backupState(qmp, nodes);
  if (state.leftovers) {
    await fleeceStop(qmp, spec.disks.length);
    nodes = await topNodes(qmp, spec.disks.length);
    state = await backupState(qmp, nodes);
  }
  const last = store.backups(spec.name).pop();
  const lastDisks = last ? store.disks(last.id) : [];
  // Which disks can go incremental: the bitmap of the last backup is there and sound.
  const prev: (string | undefined)[] = [];
  let fullReason: string | undefined = o.full ? 'asked for (--full)' : last ? undefined : 'first backup of this VM in this store';
  for (let i = 0; i < spec.disks.length; i++) {
    const bms = state.bitmaps[i]!.filter((b) => b.name?.startsWith(BACKUP_BITMAP_PREFIX)) // a fleecing job's own bitmap has no name;
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
    mark('bitmaps');
    await Promise.all(tmpFiles.map((f, i) => blankOverlay(f, spec.disks[i]!.sizeBytes, path.join(path.dirname(o.tmpDir), '.blank-qcow2'))));
    mark('overlays');
    await fleeceStart(qmp, { nodes, tmpFiles, next, prev, nbdSocket: o.nbdSocket });
    mark('fleeced');
    // What to read on each disk (all disks at once: each is a few NBD round trips).
    type Plan = { client: NbdClient; chunks: number[]; zero: Set<number>; manifest: Buffer; size: number };
    const plans: Plan[] = await Promise.all(
      spec.disks.map(async (_, i): Promise<Plan> => {
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
        return { client, chunks: chunks.sort((a, b) => a - b), zero, manifest, size };
      }),
    );
    mark('planned');
    const total = plans.reduce((a, p) => a + p.chunks.length * STORE_CHUNK, 0);
    let done = 0;
    let newBytes = 0;
    let chunksNew = 0;
    let chunksRead = 0;
    let lastReport = 0;
    const sealing: Promise<void>[] = [];
    try {
      for (const plan of plans) {
        const { client, chunks, zero, manifest, size } = plan;
        // Runs of up to 16 adjacent chunks are read as one NBD request (1 MiB: a quarter of the
        // per-request cost of 64 KiB reads), 16 deep. Worker threads name, seal and write each
        // run's chunks (sealer.ts), up to 8 runs in flight; this thread only reads.
        const runs = adjacentRuns(chunks, zero, RUN_CHUNKS);
        const DEPTH = 16;
        const inflight: Promise<Buffer>[] = [];
        const read = (r: Run) => {
          const off = r.first * STORE_CHUNK;
          return r.zero ? Promise.resolve(Buffer.alloc(0)) : client.read(off, Math.min(r.count * STORE_CHUNK, size - off));
        };
        for (let k = 0; k < Math.min(DEPTH, runs.length); k++) inflight.push(read(runs[k]!));
        for (let k = 0; k < runs.length; k++) {
          const w0 = process.hrtime.bigint();
          const data = await inflight.shift()!;
          tm.waitRead += Number(process.hrtime.bigint() - w0);
          if (k + DEPTH < runs.length) inflight.push(read(runs[k + DEPTH]!));
          const run = runs[k]!;
          chunksRead += run.count;
          if (run.zero) ZERO_ID.copy(manifest, run.first * 32);
          else {
            const plainLength = data.length;
            sealing.push(
              sealer.sealRun(data).then((r) => {
                r.ids.copy(manifest, run.first * 32);
                const n = store.adopt(r, plainLength);
                newBytes += n.bytes;
                chunksNew += n.chunks;
              }),
            );
            if (sealing.length >= 8) {
              const p0 = process.hrtime.bigint();
              await sealing.shift();
              tm.waitSeal += Number(process.hrtime.bigint() - p0);
            }
          }
          done += run.count * STORE_CHUNK;
          if (o.onProgress && Date.now() - lastReport > 250) {
            lastReport = Date.now();
            o.onProgress({ phase: 'reading', doneBytes: done, totalBytes: total, newBytes, kind });
          }
        }
      }
      await Promise.all(sealing.splice(0));
    } finally {
      await Promise.allSettled(sealing);
    }
    o.onProgress?.({ phase: 'committing', doneBytes: total, totalBytes: total, newBytes, kind });
    const disks: BackupDisk[] = plans.map((p, i) => ({ disk: i, size: p.size, manifest: p.manifest }));
    const row: BackupRow = { id, vm: spec.name, created: t0, kind, parent: kind === 'incremental' ? last!.id : null, spec: JSON.stringify(spec), bytesRead: chunksRead * STORE_CHUNK, bytesNew: newBytes, durationMs: 0 };
    row.durationMs = Date.now() - t0;
    mark('read');
    await store.commit(row, disks, mark);
    mark('committed');
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

const RUN_CHUNKS = 16;

/**
 * A blank qcow2 image for a fleecing overlay, copied from one made once per size in `cacheDir`
 * (a copy costs well under a millisecond; `qemu-img create` tens of them).
 */
async function blankOverlay(file: string, sizeBytes: number, cacheDir: string): Promise<void> {
  const tpl = path.join(cacheDir, `${sizeBytes}.qcow2`);
  if (!fs.existsSync(tpl)) {
    fs.mkdirSync(cacheDir, { recursive: true });
    const tmp = `${tpl}.${crypto.randomBytes(4).toString('hex')}.tmp`; // disks of one size race here
    await createBlank(tmp, sizeBytes);
    fs.renameSync(tmp, tpl);
  }
  fs.copyFileSync(tpl, file);
}

interface Run {
  first: number;
  count: number;
  /** known zero: not read */
  zero: boolean;
}

/** Sorted chunk indexes as runs of at most `max` adjacent chunks; known-zero chunks stand alone. */
function adjacentRuns(chunks: number[], zero: Set<number>, max: number): Run[] {
  const runs: Run[] = [];
  for (const c of chunks) {
    const last = runs[runs.length - 1];
    if (zero.has(c)) runs.push({ first: c, count: 1, zero: true });
    else if (last && !last.zero && last.first + last.count === c && last.count < max) last.count++;
    else runs.push({ first: c, count: 1, zero: false });
  }
  return runs;
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
