// Why this file exists: the QMP sequences Ferry's own migration (src/migration/) needs, as small
// functions over a QmpClient, so that only src/qemu/ speaks QMP. Facts behind them are in
// ../shared/reference/qemu-7.2.md: dirty bitmaps read over a local NBD export, I/O throttling via
// the device's QOM backend path, pause-before-switchover, and a RAM stream to a unix socket that
// the agent carries over Ferry's transport.
import type { QmpClient } from './qmp.js';

/** Bitmap names Ferry's migration creates: `ferry-m<id8>-<round>`; cleanup removes the prefix. */
export const BITMAP_PREFIX = 'ferry-m';
/** The prefix of every bitmap of one migration. */
export const bitmapPrefix = (migId: string) => `${BITMAP_PREFIX}${migId.slice(0, 8)}-`;
export const bitmapName = (migId: string, round: number) => `${bitmapPrefix(migId)}${round}`;

export async function nbdServerStart(qmp: QmpClient, sock: string): Promise<void> {
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
}

export async function nbdServerStop(qmp: QmpClient): Promise<void> {
  await qmp.execute('nbd-server-stop').catch(() => {});
}

export async function exportAdd(qmp: QmpClient, o: { id: string; node: string; name: string; writable: boolean; bitmaps?: string[]; allocationDepth?: boolean }): Promise<void> {
  await qmp.execute('block-export-add', {
    type: 'nbd',
    id: o.id,
    'node-name': o.node,
    name: o.name,
    writable: o.writable,
    ...(o.bitmaps ? { bitmaps: o.bitmaps } : {}),
    ...(o.allocationDepth ? { 'allocation-depth': true } : {}),
  });
}

/** Removes an export; waits until QEMU has really dropped it (its clients must be gone). */
export async function exportDel(qmp: QmpClient, id: string): Promise<void> {
  await qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => {});
  for (let i = 0; i < 500; i++) {
    const list = await qmp.execute<{ id: string }[]>('query-block-exports').catch(() => []);
    if (!list.some((e) => e.id === id)) return;
    await new Promise((r) => setTimeout(r, 2));
  }
}

export async function bitmapAdd(qmp: QmpClient, node: string, name: string, granularity = 4096): Promise<void> {
  await qmp.execute('block-dirty-bitmap-add', { node, name, granularity });
}

/**
 * Starts a new copy round atomically: a new enabled bitmap begins tracking at the same instant
 * the old one stops, so no write falls between them.
 */
export async function bitmapRotate(qmp: QmpClient, nodes: string[], oldName: string, newName: string, granularity = 4096): Promise<void> {
  const actions = nodes.flatMap((node) => [
    { type: 'block-dirty-bitmap-add', data: { node, name: newName, granularity } },
    { type: 'block-dirty-bitmap-disable', data: { node, name: oldName } },
  ]);
  await qmp.execute('transaction', { actions });
}

export async function bitmapRemove(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-remove', { node, name }).catch(() => {});
}

/** Every dirty bitmap Ferry's migration left on `nodes` (after a crash, for cleanup). */
export async function migrationBitmaps(qmp: QmpClient): Promise<{ node: string; name: string }[]> {
  const nodes = await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes', { flat: true });
  return nodes.flatMap((n) => (n['dirty-bitmaps'] ?? []).filter((b) => b.name.startsWith(BITMAP_PREFIX)).map((b) => ({ node: n['node-name'], name: b.name })));
}

/** Limits the guest's write bandwidth on device `vd<i>` (0 = unlimited). */
export async function ioThrottle(qmp: QmpClient, device: string, bpsWr: number): Promise<void> {
  await qmp.execute('block_set_io_throttle', { id: `/machine/peripheral/${device}/virtio-backend`, bps: 0, bps_rd: 0, bps_wr: Math.max(0, Math.round(bpsWr)), iops: 0, iops_rd: 0, iops_wr: 0 });
}

export interface RamStatus {
  status: string;
  transferred: number;
  remaining: number;
  total: number;
  /** pages/s the guest dirties */
  dirtyPagesRate: number;
  pageSize: number;
  /** dirty-bitmap syncs so far: 1 during the first pass over RAM, then one per iteration */
  dirtySyncCount: number;
  /** QEMU's measured stream rate, Mbit/s (what its switchover decision uses) */
  mbps: number;
  /** QEMU's own estimate (ms) of the downtime if it switched now */
  expectedDowntimeMs?: number;
  downtimeMs?: number;
  cpuThrottle: number;
  error?: string;
}

export async function queryMigrate(qmp: QmpClient): Promise<RamStatus> {
  const q = await qmp.execute<{
    status?: string;
    ram?: { transferred: number; remaining: number; total: number; 'dirty-pages-rate'?: number; 'page-size'?: number; 'dirty-sync-count'?: number; mbps?: number };
    'expected-downtime'?: number;
    downtime?: number;
    'cpu-throttle-percentage'?: number;
    'error-desc'?: string;
  }>('query-migrate');
  return {
    status: q.status ?? 'none',
    transferred: q.ram?.transferred ?? 0,
    remaining: q.ram?.remaining ?? 0,
    total: q.ram?.total ?? 0,
    dirtyPagesRate: q.ram?.['dirty-pages-rate'] ?? 0,
    pageSize: q.ram?.['page-size'] ?? 4096,
    dirtySyncCount: q.ram?.['dirty-sync-count'] ?? 0,
    mbps: q.ram?.mbps ?? 0,
    ...(q['expected-downtime'] !== undefined ? { expectedDowntimeMs: q['expected-downtime'] } : {}),
    ...(q.downtime !== undefined ? { downtimeMs: q.downtime } : {}),
    cpuThrottle: q['cpu-throttle-percentage'] ?? 0,
    ...(q['error-desc'] ? { error: q['error-desc'] } : {}),
  };
}

/**
 * Capabilities both sides set before the RAM stream starts (they must agree). `noVmdesc`: the
 * machine's `suppress-vmdesc`, set on both (a destination whose machine does not suppress it
 * reads one more section after the stream's end). QEMU otherwise ends every stream with a JSON
 * description of the device state for analysis tools (~100 KB raw here, ~5 KB compressed): the
 * last bytes of a switchover, which the destination's QEMU waits for before it completes and
 * nothing of Ferry's reads.
 */
export async function ramCapabilities(qmp: QmpClient, o: { xbzrle: boolean; autoConverge: boolean; noVmdesc?: boolean }): Promise<void> {
  const caps = ['pause-before-switchover', 'events', ...(o.xbzrle ? ['xbzrle'] : []), ...(o.autoConverge ? ['auto-converge'] : [])];
  await qmp.execute('migrate-set-capabilities', { capabilities: caps.map((capability) => ({ capability, state: true })) });
  if (o.noVmdesc) await qmp.execute('qom-set', { path: '/machine', property: 'suppress-vmdesc', value: true });
}

export async function ramParameters(qmp: QmpClient, p: Record<string, number>): Promise<void> {
  await qmp.execute('migrate-set-parameters', p);
}

export async function migrateTo(qmp: QmpClient, unixSocket: string): Promise<void> {
  await qmp.execute('migrate', { uri: `unix:${unixSocket}` });
}

export async function migrateIncoming(qmp: QmpClient, unixSocket: string): Promise<void> {
  await qmp.execute('migrate-incoming', { uri: `unix:${unixSocket}` });
}

export async function migrateContinue(qmp: QmpClient): Promise<void> {
  await qmp.execute('migrate-continue', { state: 'pre-switchover' });
}

export async function migrateCancel(qmp: QmpClient): Promise<void> {
  await qmp.execute('migrate_cancel').catch(() => {});
}

/** The guest's run state as QEMU sees it (running, paused, postmigrate, inmigrate, finish-migrate …). */
export async function runState(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>('query-status')).status;
}

export async function cont(qmp: QmpClient): Promise<void> {
  await qmp.execute('cont');
}

/** Gratuitous ARP/RARP from the guest's NICs so the network learns where the VM now is. */
export async function announceSelf(qmp: QmpClient): Promise<void> {
  await qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 50 }).catch(() => {});
}
