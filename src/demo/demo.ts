// Why this file exists: `ferry demo`, the README's first command. From nothing it installs what
// it needs (Debian packages, the guest image), brings up a two-host WAN lab on the wan-10 profile
// (10 Mbit/s, 50 ms one-way, 1 % loss), boots a VM running the guest workload on h1, migrates it
// live to h2 with the progress display, then reports: total time, the pause the guest saw, bytes
// on the wire, and every durable record checked inside the guest on h2.
import { DEFAULT_IMAGES_DIR, GUEST_IMAGE } from '../config.js';
import type { VmView } from '../agent/vms.js';
import { follow } from '../cli/migrate.js';
import { FerryError } from '../errors.js';
import { buildGuestImage } from '../image/build-guest.js';
import { labClient, labDown, labUp, type LabState } from '../lab/lab.js';
import { profile } from '../lab/profiles.js';
import type { MigrationView } from '../migration/source.js';
import type { GuestStats } from '../qemu/serial.js';
import { setup } from '../setup/packages.js';
import { formatDuration } from '../util/units.js';
import { sleep, waitFor } from '../util/wait.js';

const LAB = 'demo';
const SEED = 7;

export async function runDemo(opts: { keep: boolean; json: boolean }): Promise<void> {
  const say = opts.json ? () => {} : (m: string) => process.stdout.write(`${m}\n`);
  const report: Record<string, unknown> = {};
  const prof = profile('wan-10');
  say('== Ferry demo: a live migration of a running VM (RAM + local disk) across an emulated WAN ==');
  say('-- step 1: Debian packages');
  await setup({ say: (m) => say(`   ${m}`) });
  say('-- step 2: guest image (built once, cached)');
  const t0 = Date.now();
  await buildGuestImage(DEFAULT_IMAGES_DIR, { say: (m) => say(`   ${m}`) });
  report.imageSeconds = (Date.now() - t0) / 1000;

  say(`-- step 3: a WAN lab: two hosts joined by an emulated ${prof.description} link (TCP CUBIC)`);
  await labDown(LAB, { force: true });
  const lab = await labUp({ name: LAB, base: '10.170', profile: 'wan-10', scheduleOutage: false, say: (m) => say(`   ${m}`) });
  const [h1, h2] = lab.hosts as [LabState['hosts'][0], LabState['hosts'][0]];
  const a = labClient(h1);
  const b = labClient(h2);
  try {
    const host = await a.get<Record<string, unknown>>('/v1/host');
    say(`   accelerator ${host.accel} (${host.accelReason}), ${host.qemuVersion}`);
    report.accel = host.accel;

    say('-- step 4: VM "demo" on h1 (256 MiB RAM, 256 MiB data disk) running its workload');
    await a.post<VmView>('/v1/vms', {
      name: 'demo',
      memoryMiB: 256,
      image: GUEST_IMAGE,
      disks: [{ sizeBytes: 256 * 1024 ** 2 }],
      workload: { heartbeatHz: 50, writeRate: 100 * 1024, seed: SEED, dirtyMiB: 16 },
    });
    const tStart = Date.now();
    await a.post('/v1/vms/demo/start');
    const ready = await waitFor('the guest to boot', 120_000, async () => {
      const s = await a.get<GuestStats>('/v1/vms/demo/guest');
      return s.ready ? s : undefined;
    });
    report.bootSeconds = (Date.now() - tStart) / 1000;
    say(`   booted to userspace in ${(report.bootSeconds as number).toFixed(1)} s; ${ready.rootLine ?? ''}`);
    for (let i = 0; i < 3; i++) {
      await sleep(1000);
      const s = await a.get<GuestStats>('/v1/vms/demo/guest');
      say(`   t+${i + 1}s  heartbeats ${String(s.heartbeats).padStart(5)} (50 Hz)  durable writes ${String(s.lastDurableSeq).padStart(5)} (100 KB/s, O_DIRECT|O_DSYNC)  16 MiB of RAM rewritten continuously`);
    }

    say('-- step 5: live migration h1 → h2 across the WAN (ferry migrate demo --to h2)');
    const started = await a.post<MigrationView>('/v1/vms/demo/migrate', { to: 'h2', maxDowntimeMs: 300 });
    const v = await follow(a, started.id, { json: opts.json, quiet: opts.json });
    if (v.phase !== 'done') throw new FerryError('MIGRATION_FAILED', `demo: the migration ended ${v.phase}: ${v.error?.message ?? ''}`);
    report.migration = { totalSec: v.result!.totalMs / 1000, pausedMs: v.result!.pausedMs, qemuDowntimeMs: v.result!.qemuDowntimeMs, wireBytes: v.wire.sentBytes, diskBytes: v.disk.sentBytes, ramStreamBytes: v.ram?.streamBytes };

    say('-- step 6: the report');
    const after = await waitFor('heartbeats on h2', 30_000, async () => {
      const s = await b.get<GuestStats>('/v1/vms/demo/guest');
      return s.heartbeats >= 50 ? s : undefined;
    });
    const across = after.firstHeartbeatAt! - v.final!.lastHeartbeatAt!;
    report.guestGapMs = Math.max(across, v.final!.maxGapMs, after.maxGapMs);
    say(`   total ${formatDuration(v.result!.totalMs)}; the guest saw at most ${formatDuration(report.guestGapMs as number)} between heartbeats (across the switch ${formatDuration(across)}); QEMU paused it ${v.result!.pausedMs} ms`);
    say(`   on the wire ${(v.wire.sentBytes / 2 ** 20).toFixed(1)} MiB for ${(v.disk.sentBytes / 2 ** 20).toFixed(1)} MiB of disk blocks and ${((v.ram?.streamBytes ?? 0) / 2 ** 20).toFixed(1)} MiB of QEMU RAM stream; ${v.wire.resentFrames} frames re-sent`);
    const repaired = v.result?.switchover?.ramRepairedMiB ?? 0;
    say(`   verified before the switchover: every block written read back and hash-checked; ${v.verify?.groups ?? 0} whole-disk group hashes compared; guest RAM compared MiB by MiB with both guests paused${repaired ? ` (${repaired} MiB that QEMU left stale were repaired from the source)` : ' (identical)'}`);

    say('-- step 7: every durable record, checked inside the guest on h2 (typed on its serial console)');
    const upto = v.atSwitchover!.lastDurableSeq;
    await b.post('/v1/vms/demo/console', { data: `ferry-guest check --dev /dev/vdb --seed ${SEED} --upto ${upto}\n` });
    const line = await waitFor('the in-guest checker', 60_000, async () => {
      const res = await b.raw('GET', '/v1/vms/demo/console?lines=400');
      const text = await res.text();
      return text.split('\n').find((l) => l.startsWith(`FERRY-CHECK`) && l.includes(`upto=${upto}`));
    });
    say(`   guest: ${line.trim()}`);
    report.guestCheck = line.trim();
    const vms1 = await a.get<VmView[]>('/v1/vms');
    const vms2 = await b.get<VmView[]>('/v1/vms');
    say(`   h1 runs ${vms1.length} VM(s); h2 runs: ${vms2.map((x) => `${x.name} (${x.state})`).join(', ')}`);
    if (!line.includes('OK') || vms1.length !== 0) throw new FerryError('INTERNAL', 'demo: integrity check failed');
    say('== demo complete ==');
    if (opts.keep) say(`   lab left up: ferry lab cli --name ${LAB} h2 vm list;  ferry lab down --name ${LAB}`);
    if (opts.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  } finally {
    if (!opts.keep) await labDown(LAB, { force: true });
  }
}
