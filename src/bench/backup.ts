// Why this file exists: `ferry bench backup` — what issue 6's targets are measured by. On one
// host (a private agent in a scratch data dir, a real TCG guest): a full backup of a VM whose
// data disk holds `used` bytes (half random, half real Debian file data), a 1 % change written
// in the guest and an incremental backup, a second VM from the same template whose data differs
// by 5 %, and `qemu-img convert -c -O qcow2` of the same disks in the same run as the yardstick.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../cli/client.js';
import { distDir, GUEST_IMAGE, DEFAULT_IMAGES_DIR } from '../config.js';
import { readImage } from '../image/catalog.js';
import type { GuestStats } from '../qemu/serial.js';
import { openStore } from '../store/store.js';
import { run } from '../util/exec.js';
import { sleep, waitFor } from '../util/wait.js';
import type { JobView } from '../agent/jobs.js';
import type { BackupResult } from '../backup/create.js';
import { makeDataDisk } from './scenario.js';

export interface BackupBenchOptions {
  diskBytes: number;
  usedBytes: number;
  seed: number;
  workDir: string;
  say: (m: string) => void;
}

export interface BackupBenchReport {
  startedAt: string;
  machine: string;
  scenario: { diskBytes: number; usedBytes: number; templateBytes: number };
  full: { sec: number; bytesRead: number; mbPerSec: number; storedBytes: number };
  incremental: { changedBytes: number; sec: number; bytesRead: number; ratioToFull: number };
  dedup: { oneVmStored: number; twoVmsStored: number; differenceBytes: number; ratio: number };
  qemuImg: { sec: number; mbPerSec: number; outputBytes: number };
  /** live snapshots of VM a: the QMP transaction, and the largest heartbeat gap the guest saw */
  snapshots: { diskOnlyPauseMs: number; diskOnlyGuestGapMs: number; memoryPauseMs: number; memoryGuestGapMs: number; memoryStateBytes: number };
}

const cli = (dataDir: string, args: string[]) => spawnSync(process.execPath, [path.join(distDir, 'cli', 'main.js'), '--data-dir', dataDir, ...args], { encoding: 'utf8' });

export async function benchBackup(o: BackupBenchOptions): Promise<BackupBenchReport> {
  const say = o.say;
  const dataDir = o.workDir;
  fs.rmSync(dataDir, { recursive: true, force: true });
  fs.mkdirSync(dataDir, { recursive: true });
  const init = cli(dataDir, ['agent', 'init', '--listen', '127.0.0.1:7495', '--transport-listen', '127.0.0.1:7496', '--host-name', 'bench-backup']);
  if (init.status !== 0) throw new Error(`agent init: ${init.stderr}`);
  // The agent's output stays in the work dir (agent.log) for a look afterwards.
  const logFd = fs.openSync(path.join(dataDir, 'agent.log'), 'w');
  const agent = spawn(process.execPath, [path.join(distDir, 'cli', 'main.js'), '--data-dir', dataDir, 'agent', 'run'], { stdio: ['ignore', logFd, logFd] });
  fs.closeSync(logFd);
  const api = new AgentClient({ dataDir });
  try {
    await waitFor('the bench agent', 60_000, () => api.get('/v1/host'));
    const img = readImage(DEFAULT_IMAGES_DIR, GUEST_IMAGE);
    const vm = async (name: string, seed: number) => {
      const file = path.join(dataDir, 'import', `${name}.qcow2`);
      await makeDataDisk(file, { diskBytes: o.diskBytes, usedBytes: o.usedBytes, seed }, img.root);
      await api.post('/v1/vms', { name, image: GUEST_IMAGE, memoryMiB: 256, disks: [{ file }], workload: { heartbeatHz: 20 } });
      await api.post(`/v1/vms/${name}/start`);
      await waitFor(`${name} to boot`, 180_000, async () => ((await api.get<GuestStats>(`/v1/vms/${name}/guest`)).ready ? true : undefined));
      return file;
    };
    const guestRun = async (name: string, cmd: string) => {
      const marker = `BENCH-DONE-${Date.now()}`;
      await api.post(`/v1/vms/${name}/console`, { data: `${cmd}; echo ${marker}\n` });
      await waitFor(`${name}: ${cmd}`, 300_000, async () => {
        const text = fs.readFileSync(path.join(dataDir, 'vms', name, 'serial.log'), 'utf8');
        return text.includes(`\n${marker}`) || text.endsWith(marker) ? true : undefined;
      });
    };
    // A backup's time is from the request to its job's end (same host clock): the store opened,
    // QEMU set up, the disks read, the commit made durable and QEMU released.
    const backup = async (name: string): Promise<BackupResult & { jobMs: number }> => {
      const asked = Date.now();
      const j = await api.post<JobView>(`/v1/vms/${name}/backups`, {});
      for (;;) {
        const v = await api.get<JobView>(`/v1/jobs/${j.id}`);
        if (v.state === 'done') return { ...(v.result as BackupResult), jobMs: v.endedAt! - asked };
        if (v.state === 'failed') throw new Error(`backup of ${name}: ${v.error?.message}`);
        await sleep(100);
      }
    };
    const stored = () => {
      const s = openStore(path.join(dataDir, 'store'));
      const i = s.info();
      s.close();
      return i.storedBytes;
    };

    say(`preparing VM a: a ${Math.round(o.diskBytes / 2 ** 20)} MiB data disk with ${Math.round(o.usedBytes / 2 ** 20)} MiB used, on the ${GUEST_IMAGE} template`);
    const fileA = await vm('a', o.seed);
    say('qemu-img convert -c -O qcow2 of the same disks (the yardstick)');
    const q0 = Date.now();
    const vda = path.join(dataDir, 'vms', 'a', 'vda.qcow2');
    await run('qemu-img', ['convert', '-U', '-c', '-O', 'qcow2', vda, path.join(dataDir, 'q-vda.qcow2')]);
    await run('qemu-img', ['convert', '-U', '-c', '-O', 'qcow2', fileA, path.join(dataDir, 'q-vdb.qcow2')]);
    // Durable, as a backup must be (and so the backup after it does not pay for its dirty pages:
    // the store's commit syncs the whole file system).
    await run('sync', ['-f', path.join(dataDir, 'q-vdb.qcow2')]);
    const qSec = (Date.now() - q0) / 1000;
    const qOut = fs.statSync(path.join(dataDir, 'q-vda.qcow2')).size + fs.statSync(path.join(dataDir, 'q-vdb.qcow2')).size;

    say('full backup of a');
    const full = await backup('a');
    const fullSec = full.jobMs / 1000;
    const afterFull = stored();
    say(`  read ${Math.round(full.bytesRead / 2 ** 20)} MiB in ${fullSec.toFixed(2)} s, stored ${Math.round(afterFull / 2 ** 20)} MiB`);
    const qMbps = full.bytesRead / 1e6 / qSec;

    const change = Math.round(full.bytesRead / 100 / 65536) * 65536;
    say(`the guest rewrites ${change >> 10} KiB (1 % of the used data) at 64 scattered places, then an incremental backup`);
    const per = Math.max(1, Math.round(change / 65536 / 64));
    await guestRun('a', `for i in $(seq 0 63); do dd if=/dev/urandom of=/dev/vdb bs=64K count=${per} seek=$((i * ${Math.floor(o.usedBytes / 65536 / 64)})) oflag=direct status=none; done; sync`);
    const incr = await backup('a');
    say(`  read ${incr.bytesRead >> 10} KiB in ${(incr.jobMs / 1000).toFixed(3)} s (${incr.kind})`);
    const oneVm = stored();

    say('snapshots of a, live: disk-only, then with memory (guest heartbeat 20 Hz)');
    const snap = async (name: string, memory: boolean) => {
      await api.post('/v1/vms/a/guest/reset-gap');
      await sleep(1000);
      const r = await api.post<{ pauseMs: number; stateBytes?: number }>('/v1/vms/a/snapshots', { name, memory });
      await sleep(1000);
      const g = await api.get<GuestStats>('/v1/vms/a/guest');
      return { pauseMs: r.pauseMs, gapMs: g.maxGapMs, stateBytes: r.stateBytes ?? 0 };
    };
    const sd = await snap('disk-only', false);
    const sm = await snap('with-memory', true);
    say(`  disk-only: ${sd.pauseMs} ms transaction, guest gap ${sd.gapMs} ms; with memory: ${sm.pauseMs} ms pause, guest gap ${sm.gapMs} ms`);

    say('VM b: the same template and data disk, 5 % of it rewritten with new data; backed up into the same store');
    await vm('b', o.seed);
    const diff = Math.round(o.usedBytes / 20 / 65536) * 65536;
    await guestRun('b', `dd if=/dev/urandom of=/dev/vdb bs=64K count=${diff / 65536} seek=${Math.floor(o.usedBytes / 2 / 65536)} oflag=direct status=none; sync`);
    await backup('b');
    const twoVms = stored();
    return {
      startedAt: new Date().toISOString(),
      machine: `${(await run('nproc', [])).stdout.trim()} cores, TCG guests`,
      scenario: { diskBytes: o.diskBytes, usedBytes: o.usedBytes, templateBytes: fs.statSync(img.root).size },
      full: { sec: fullSec, bytesRead: full.bytesRead, mbPerSec: full.bytesRead / 1e6 / fullSec, storedBytes: afterFull },
      incremental: { changedBytes: change, sec: incr.jobMs / 1000, bytesRead: incr.bytesRead, ratioToFull: incr.jobMs / full.jobMs },
      dedup: { oneVmStored: oneVm, twoVmsStored: twoVms, differenceBytes: diff, ratio: twoVms / (oneVm + diff) },
      qemuImg: { sec: qSec, mbPerSec: qMbps, outputBytes: qOut },
      snapshots: { diskOnlyPauseMs: sd.pauseMs, diskOnlyGuestGapMs: sd.gapMs, memoryPauseMs: sm.pauseMs, memoryGuestGapMs: sm.gapMs, memoryStateBytes: sm.stateBytes },
    };
  } finally {
    for (const n of ['a', 'b']) await api.del(`/v1/vms/${n}?force=true`).catch(() => {});
    agent.kill('SIGTERM');
    await sleep(500);
  }
}

export function backupTable(r: BackupBenchReport): string {
  const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;
  return [
    '| measure | Ferry | qemu-img convert -c | target |',
    '|---|---|---|---|',
    `| full backup of ${mib(r.full.bytesRead)} used data | ${r.full.sec.toFixed(2)} s, **${r.full.mbPerSec.toFixed(0)} MB/s**, ${mib(r.full.storedBytes)} stored | ${r.qemuImg.sec.toFixed(2)} s, ${r.qemuImg.mbPerSec.toFixed(0)} MB/s, ${mib(r.qemuImg.outputBytes)} | ≥ 150 MB/s |`,
    `| incremental after a 1 % change (${mib(r.incremental.changedBytes)}) | ${(r.incremental.sec * 1000).toFixed(0)} ms, read ${mib(r.incremental.bytesRead)}, **${(r.incremental.ratioToFull * 100).toFixed(1)} %** of the full's time | (no incremental) | ≤ 3 % |`,
    `| live snapshot, disk-only | QMP transaction ${r.snapshots.diskOnlyPauseMs} ms; largest guest heartbeat gap (20 Hz) **${r.snapshots.diskOnlyGuestGapMs} ms** | | pause < 100 ms |`,
    `| live snapshot with memory (${mib(r.snapshots.memoryStateBytes)} of state) | pause ${r.snapshots.memoryPauseMs} ms; largest guest heartbeat gap ${r.snapshots.memoryGuestGapMs} ms | | |`,
    `| two VMs from one template (5 % = ${mib(r.dedup.differenceBytes)} differ) | ${mib(r.dedup.twoVmsStored)} stored vs ${mib(r.dedup.oneVmStored)} for one: **${r.dedup.ratio.toFixed(3)}×** (one VM + the difference) | 2 full copies | ≤ 1.1× |`,
  ].join('\n');
}
