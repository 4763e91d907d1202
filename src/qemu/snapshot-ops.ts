// Why this file exists: the QMP sequences behind external snapshots, so only src/qemu/ speaks
// QMP: a live `blockdev-snapshot` of every disk in one transaction (the running VM moves onto new
// overlays; the old images become read-only points in time), a live `block-stream` that merges a
// deleted snapshot's data into the image above it, and the VM's memory and device state saved to
// (and loaded from) a file through the migration stream.
import fs from 'node:fs';
import net from 'node:net';
import { FerryError } from '../errors.js';
import { sleep } from '../util/wait.js';
import { migrateContinue, migrateIncoming, migrateTo, queryMigrate } from './migration-ops.js';
import type { QmpClient } from './qmp.js';

/** The node each disk's device reads through now (after a live snapshot it is no longer diskN). */
export async function topNodes(qmp: QmpClient, disks: number): Promise<string[]> {
  const blocks = await qmp.execute<{ qdev?: string; inserted?: { 'node-name': string } }[]>('query-block');
  return Array.from({ length: disks }, (_, i) => {
    const b = blocks.find((x) => x.qdev === `/machine/peripheral/vd${i}/virtio-backend` || x.qdev === `vd${i}`);
    if (!b?.inserted) throw new FerryError('QEMU_FAILED', `QEMU shows no medium for disk ${i}`);
    return b.inserted['node-name'];
  });
}

/** Node name of the qcow2 node whose image file is `file`. */
export async function nodeOfFile(qmp: QmpClient, file: string): Promise<string | undefined> {
  const nodes = await qmp.execute<{ 'node-name': string; drv: string; file: string }[]>('query-named-block-nodes', { flat: true });
  return nodes.find((n) => n.drv === 'qcow2' && n.file === file)?.['node-name'];
}

/** Moves every disk onto a new overlay, atomically across disks; returns how long it took. */
export async function liveSnapshot(qmp: QmpClient, disks: { top: string; overlayFile: string; node: string }[]): Promise<number> {
  for (const d of disks) await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': d.node, file: { driver: 'file', filename: d.overlayFile }, backing: null });
  const t0 = process.hrtime.bigint();
  try {
    await qmp.execute('transaction', { actions: disks.map((d) => ({ type: 'blockdev-snapshot', data: { node: d.top, overlay: d.node } })) });
  } catch (e) {
    for (const d of disks) await qmp.execute('blockdev-del', { 'node-name': d.node }).catch(() => {});
    throw e;
  }
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/** Merges the images between `node` and `baseFile` (exclusive) into `node`, live; waits for it. */
export async function streamInto(qmp: QmpClient, node: string, baseFile: string | undefined, jobId: string): Promise<void> {
  await qmp.execute('block-stream', { 'job-id': jobId, device: node, ...(baseFile ? { base: baseFile } : {}), 'auto-dismiss': false });
  for (;;) {
    const jobs = await qmp.execute<{ id: string; status: string; error?: string }[]>('query-jobs');
    const j = jobs.find((x) => x.id === jobId);
    if (!j) throw new FerryError('QEMU_FAILED', `block-stream job ${jobId} vanished`);
    if (j.status === 'concluded') {
      await qmp.execute('job-dismiss', { id: jobId });
      if (j.error) throw new FerryError('QEMU_FAILED', `merging into ${node} failed: ${j.error}`);
      return;
    }
    await sleep(50);
  }
}

/**
 * Saves RAM and device state to `file` through the migration stream (a local socket), with the
 * guest paused throughout: a live pre-copy would be shorter, but QEMU 7.2's pre-copy under TCG
 * can leave pages stale (docs/benchmarks.md), and a stopped guest's pages are all sent once,
 * with no dirty tracking involved. At the end `atPause` runs (the disk snapshot: same instant)
 * and the guest resumes. Returns the pause in ms.
 */
export async function saveState(qmp: QmpClient, sock: string, file: string, atPause: () => Promise<void>): Promise<{ pauseMs: number; bytes: number }> {
  fs.rmSync(sock, { force: true });
  const out = fs.createWriteStream(file, { flags: 'wx' });
  let bytes = 0;
  const done = new Promise<void>((resolve, reject) => {
    out.on('error', reject);
    out.on('finish', () => resolve());
  });
  const server = net.createServer((c) => {
    c.on('data', (d: Buffer) => {
      bytes += d.length;
      if (!out.write(d)) {
        c.pause();
        out.once('drain', () => c.resume());
      }
    });
    c.on('end', () => out.end());
    c.on('error', () => out.destroy(new Error('the state stream broke')));
  });
  await new Promise<void>((r, j) => server.once('error', j).listen(sock, r));
  let pausedAt = 0;
  try {
    pausedAt = Date.now();
    await qmp.execute('stop');
    await qmp.execute('migrate-set-capabilities', { capabilities: ['pause-before-switchover', 'events'].map((capability) => ({ capability, state: true })) });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1 << 30, 'downtime-limit': 100 });
    await migrateTo(qmp, sock);
    for (;;) {
      const st = await queryMigrate(qmp);
      if (st.status === 'pre-switchover') break;
      if (st.status === 'failed' || st.status === 'cancelled') throw new FerryError('QEMU_FAILED', `saving the VM state failed: ${st.error ?? st.status}`);
      await sleep(5);
    }
    await atPause();
    await migrateContinue(qmp);
    for (;;) {
      const st = await queryMigrate(qmp);
      if (st.status === 'completed') break;
      if (st.status === 'failed' || st.status === 'cancelled') throw new FerryError('QEMU_FAILED', `saving the VM state failed: ${st.error ?? st.status}`);
      await sleep(5);
    }
    await done;
    await qmp.execute('cont');
    return { pauseMs: Date.now() - pausedAt, bytes };
  } catch (e) {
    await qmp.execute('migrate_cancel').catch(() => {});
    if (pausedAt) await qmp.execute('cont').catch(() => {});
    out.destroy();
    fs.rmSync(file, { force: true });
    throw e;
  } finally {
    server.close();
    fs.rmSync(sock, { force: true });
  }
}

/** Feeds a saved state file to a QEMU started with `-incoming defer`; waits until it loaded. */
export async function loadState(qmp: QmpClient, sock: string, file: string): Promise<void> {
  fs.rmSync(sock, { force: true });
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await migrateIncoming(qmp, sock); // QEMU listens on the socket
  for (let i = 0; i < 500 && !fs.existsSync(sock); i++) await sleep(10);
  const c = net.connect(sock);
  const r = fs.createReadStream(file);
  const fed = new Promise<void>((resolve, reject) => {
    c.once('error', reject);
    r.once('error', reject);
    c.once('finish', resolve);
  });
  r.pipe(c);
  try {
    await fed;
    for (;;) {
      const st = await queryMigrate(qmp);
      if (st.status === 'completed') return;
      if (st.status === 'failed') throw new FerryError('QEMU_FAILED', `loading the VM state failed: ${st.error ?? ''}`);
      await sleep(10);
    }
  } finally {
    c.destroy();
    fs.rmSync(sock, { force: true });
  }
}
