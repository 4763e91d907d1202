// Why this file exists: the QMP sequences behind a crash-consistent backup of a running VM
// ("image fleecing"), so that only src/qemu/ speaks QMP. For each disk a temporary qcow2 whose
// backing is the live disk node receives, by a `blockdev-backup sync=none` job, the old content
// of every block the guest overwrites; reading that node gives the disk as it was at one instant
// while the guest keeps running. One `transaction` starts the jobs of all disks, adds the next
// persistent dirty bitmap and freezes the previous one, at the same instant.
import type { QmpClient } from './qmp.js';

export const BACKUP_BITMAP_PREFIX = 'ferry-bk-';

export interface BitmapInfo {
  name: string;
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
  count: number;
}

// `node` below is a disk's top node (snapshot-ops.ts topNodes: after a live snapshot it is no
// longer diskN). Bitmaps live on it: a snapshot moves the VM to a new node, which has none, so
// the next backup reads everything — never less than changed.

/** Dirty bitmaps on a disk's top node. */
/**
 * The backup bitmaps of each of `nodes`, and whether an interrupted backup left fleecing nodes
 * behind (one query for all of it).
 */
export async function backupState(qmp: QmpClient, nodes: string[]): Promise<{ bitmaps: BitmapInfo[][]; leftovers: boolean }> {
  const all = await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean; persistent: boolean; inconsistent?: boolean; count: number }[] }[]>('query-named-block-nodes', { flat: true });
  const bitmaps = nodes.map((node) => (all.find((x) => x['node-name'] === node)?.['dirty-bitmaps'] ?? []).map((b) => ({ name: b.name, recording: b.recording, persistent: b.persistent, inconsistent: !!b.inconsistent, count: b.count })));
  return { bitmaps, leftovers: all.some((x) => x['node-name']?.startsWith('fleece')) };
}

export async function removeBitmap(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-remove', { node, name }).catch(() => {});
}

/**
 * Freezes the point in time. `tmpFiles[i]` is an empty qcow2 of disk i's size. Adds bitmap
 * `next` on every disk, and disables `prev[i]` where given (its content: changes since the last
 * backup, up to now).
 */
export async function fleeceStart(qmp: QmpClient, o: { nodes: string[]; tmpFiles: string[]; next: string; prev: (string | undefined)[]; nbdSocket: string }): Promise<void> {
  for (const [i, f] of o.tmpFiles.entries()) {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': `fleece${i}`, file: { driver: 'file', filename: f }, backing: o.nodes[i]! });
  }
  const actions: unknown[] = [];
  for (let i = 0; i < o.tmpFiles.length; i++) {
    const node = o.nodes[i]!;
    actions.push({ type: 'blockdev-backup', data: { device: node, target: `fleece${i}`, sync: 'none', 'job-id': `ferry-fleece${i}`, 'auto-finalize': true, 'auto-dismiss': true } });
    actions.push({ type: 'block-dirty-bitmap-add', data: { node, name: o.next, persistent: true, granularity: 65536 } });
    const p = o.prev[i];
    if (p) actions.push({ type: 'block-dirty-bitmap-disable', data: { node, name: p } });
  }
  await qmp.execute('transaction', { actions });
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: o.nbdSocket } } });
  for (let i = 0; i < o.tmpFiles.length; i++) {
    const p = o.prev[i];
    await qmp.execute('block-export-add', { type: 'nbd', id: `ferry-bk${i}`, 'node-name': `fleece${i}`, name: `bk${i}`, writable: false, ...(p ? { bitmaps: [p] } : {}) });
  }
}

/** Undoes fleeceStart (every step tolerates a half-done start). */
export async function fleeceStop(qmp: QmpClient, disks: number): Promise<void> {
  for (let i = 0; i < disks; i++) await qmp.execute('block-export-del', { id: `ferry-bk${i}`, mode: 'hard' }).catch(() => {});
  await qmp.execute('nbd-server-stop').catch(() => {});
  for (let i = 0; i < disks; i++) await qmp.execute('block-job-cancel', { device: `ferry-fleece${i}`, force: true }).catch(() => {});
  for (let t = 0; t < 500; t++) {
    const jobs = await qmp.execute<{ id: string }[]>('query-jobs').catch(() => []);
    if (!jobs.some((j) => j.id.startsWith('ferry-fleece'))) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  for (let i = 0; i < disks; i++) await qmp.execute('blockdev-del', { 'node-name': `fleece${i}` }).catch(() => {});
}

/**
 * After the backup: on success the previous bitmap goes (the new one tracks from this backup);
 * on failure the new one is merged back into the previous, which records again, so no change
 * since the last good backup is forgotten.
 */
export async function settleBitmaps(qmp: QmpClient, node: string, o: { ok: boolean; next: string; prev?: string }): Promise<void> {
  if (o.ok) {
    if (o.prev) await qmp.execute('block-dirty-bitmap-remove', { node, name: o.prev });
    return;
  }
  if (o.prev) {
    await qmp.execute('block-dirty-bitmap-merge', { node, target: o.prev, bitmaps: [o.next] });
    await qmp.execute('block-dirty-bitmap-enable', { node, name: o.prev });
  }
  await qmp.execute('block-dirty-bitmap-remove', { node, name: o.next });
}
