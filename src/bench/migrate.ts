// Why this file exists: `ferry bench migrate` — one migration run on the WAN lab, measured the
// same way for every contender: total time, guest-seen downtime (largest heartbeat gap, host
// clock, across both hosts), QEMU's own downtime figure, wire bytes per direction (the
// emulator's counters), link-limit time, and integrity (destination disks equal the source's
// final disks except where the guest wrote after the switchover, and the guest checker finds
// every record the guest reported durable before it). Every run is bounded by a timeout and a
// failed run is recorded as failed, never dropped.
//
// Contenders: QEMU native (libvirt-style) with a named tuning, and Ferry's own migration
// (src/migration/), each in a fresh lab with the same scenario and seed.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { MigrationJob } from '../agent/native-migration.js';
import type { VmView } from '../agent/vms.js';
import { progressLine } from '../cli/migrate.js';
import type { MigrationView } from '../migration/source.js';
import type { AgentClient } from '../cli/client.js';
import { GUEST_IMAGE } from '../config.js';
import { readImage } from '../image/catalog.js';
import { checkDisk } from '../image/check-disk.js';
import { labClient, labCut, labDown, labUp, relayCommand, type LabState } from '../lab/lab.js';
import { profile as getProfile } from '../lab/profiles.js';
import type { RelayStatus } from '../lab/relay.js';
import type { GuestStats } from '../qemu/serial.js';
import { run } from '../util/exec.js';
import { sleep, waitFor } from '../util/wait.js';
import { NATIVE_VARIANTS, makeDataDisk, type Scenario } from './scenario.js';
import { storeInit } from '../store/store.js';
import type { JobView } from '../agent/jobs.js';

export interface Sample {
  t: number;
  wireFwd: number;
  wireRev: number;
  phase: string;
}

export interface RunResult {
  contender: string;
  ok: boolean;
  error?: string;
  totalSec?: number;
  guestDowntimeMs?: number;
  qemuDowntimeMs?: number;
  wireBytesFwd?: number;
  wireBytesRev?: number;
  linkLimitSec?: number;
  /** share of transport frames sent more than once (Ferry only) */
  resentPct?: number;
  /** libvirt-style --timeout suspended the guest at this many seconds */
  suspendedAtSec?: number;
  integrity?: { disksEqual: boolean; differingBlocks: number; recordsOk: boolean; durableSeq: number; detail: string };
  samples: Sample[];
}

const VM = 'bench';

function wire(r: RelayStatus): { fwd: number; rev: number } {
  return { fwd: r.directions['1>2']!.counters.bytes, rev: r.directions['2>1']!.counters.bytes };
}

/** Compares two disk images 4 KiB block by block, ignoring `allowed` extents. */
async function compareDisks(a: string, b: string, allowed: { offset: number; length: number }[]): Promise<number> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-cmp-'));
  try {
    const ra = path.join(tmp, 'a.raw');
    const rb = path.join(tmp, 'b.raw');
    await run('qemu-img', ['convert', '-U', '-O', 'raw', a, ra]);
    await run('qemu-img', ['convert', '-U', '-O', 'raw', b, rb]);
    const fa = fs.openSync(ra, 'r');
    const fb = fs.openSync(rb, 'r');
    const size = Math.max(fs.fstatSync(fa).size, fs.fstatSync(fb).size);
    const skip = (off: number) => allowed.some((e) => off >= e.offset && off < e.offset + e.length);
    const CH = 4 << 20;
    const ba = Buffer.alloc(CH);
    const bb = Buffer.alloc(CH);
    let differing = 0;
    for (let off = 0; off < size; off += CH) {
      const na = fs.readSync(fa, ba, 0, CH, off);
      const nb = fs.readSync(fb, bb, 0, CH, off);
      if (na === nb && ba.subarray(0, na).equals(bb.subarray(0, nb))) continue;
      for (let o = 0; o < Math.max(na, nb); o += 4096) {
        if (!ba.subarray(o, o + 4096).equals(bb.subarray(o, o + 4096)) && !skip(off + o)) differing++;
      }
    }
    fs.closeSync(fa);
    fs.closeSync(fb);
    return differing;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

export async function runNative(lab: LabState, s: Scenario, variant: string, say: (m: string) => void): Promise<RunResult> {
  const base = NATIVE_VARIANTS[variant];
  const tuning = base && s.suspendAfterSec !== undefined ? { ...base, suspendAfterSec: s.suspendAfterSec } : base;
  if (!tuning) throw new Error(`unknown native variant ${variant} (known: ${Object.keys(NATIVE_VARIANTS).join(', ')})`);
  const contender = `native/${variant}`;
  const [h1, h2] = lab.hosts as [LabState['hosts'][0], LabState['hosts'][0]];
  const src: AgentClient = labClient(h1);
  const dst: AgentClient = labClient(h2);
  const prof = getProfile(s.profile);
  const samples: Sample[] = [];
  const result: RunResult = { contender, ok: false, samples };
  const image = readImage(JSON.parse(fs.readFileSync(path.join(h1.dataDir, 'agent.json'), 'utf8')).imagesDir, GUEST_IMAGE);
  try {
    const spec = await setupVm(src, h1.dataDir, s, variant, image.root, say);

    await relayCommand(lab, { op: 'reset' });
    const t0 = Date.now();
    say(`  ${contender}: migrating h1 → h2 (${prof.description})`);
    await dst.post('/v1/migrations/native/incoming', { spec, from: h1.name, listenHost: h2.wanIp, nbdPort: 10809, migratePort: 4444, tuning });
    await dst.post(`/v1/migrations/native/incoming/${VM}/finish`, { timeoutMs: s.timeoutSec * 1000 });
    await src.post(`/v1/vms/${VM}/migrate/native`, { host: h2.wanIp, nbdPort: 10809, migratePort: 4444, tuning, timeoutMs: s.timeoutSec * 1000, to: h2.name });
    if (prof.outage) {
      await labCut(lab.name, { seconds: prof.outage.seconds, flap: prof.outage.flap, inSeconds: prof.outage.afterSeconds });
      say(`  outage of ${prof.outage.seconds} s scheduled at t+${prof.outage.afterSeconds} s${prof.outage.flap ? ' (flap)' : ''}`);
    }
    let lastLog = 0;
    const job = await waitFor<MigrationJob>('the migration', s.timeoutSec * 1000 + 30_000, async () => {
      const j = await src.get<MigrationJob>(`/v1/vms/${VM}/migration`);
      const w = wire(await relayCommand(lab, { op: 'status' }));
      const t = (Date.now() - t0) / 1000;
      samples.push({ t, wireFwd: w.fwd, wireRev: w.rev, phase: j.progress?.phase ?? 'start' });
      if (t - lastLog >= 30) {
        lastLog = t;
        const p = j.progress;
        say(`  t+${t.toFixed(0)}s ${p?.phase ?? '-'} mirror ${Math.round((p?.mirrorDone ?? 0) / 2 ** 20)}/${Math.round((p?.mirrorTotal ?? 0) / 2 ** 20)} MiB, ram ${Math.round((p?.ram?.transferred ?? 0) / 2 ** 20)} MiB, wire ${Math.round(w.fwd / 2 ** 20)} MiB${p?.ram?.throttle ? `, CPU throttle ${p.ram.throttle} %` : ''}`);
      }
      return j.state === 'running' ? undefined : j;
    }, { everyMs: 1000, retryErrors: false });
    const w = wire(await relayCommand(lab, { op: 'status' }));
    if (job.state !== 'completed') throw new Error(job.error ?? 'migration failed');
    result.totalSec = (Date.now() - t0) / 1000;
    result.qemuDowntimeMs = job.result!.qemuDowntimeMs;
    if (job.result!.suspendedAtMs !== undefined) result.suspendedAtSec = job.result!.suspendedAtMs / 1000;
    result.wireBytesFwd = w.fwd;
    result.wireBytesRev = w.rev;
    result.linkLimitSec = ((w.fwd + w.rev) * 8) / prof.link.rateBps;

    // Guest-seen downtime: the largest heartbeat gap on either host, and across the switch.
    await waitFor('the destination to resume', 60_000, async () => {
      const j = await dst.get<MigrationJob>(`/v1/vms/${VM}/migration`);
      if (j.state === 'failed') throw new Error(`destination: ${j.error}`);
      return j.state === 'completed' ? j : undefined;
    }, { everyMs: 100, retryErrors: false });
    await measureAfter(result, { dst, h1, h2, spec, image, s, srcFinal: job.final!, atSwitchover: job.atSwitchover, say });
  } catch (e) {
    result.ok = false;
    result.error = (e as Error).message;
    say(`  ${contender} FAILED: ${result.error}`);
  } finally {
    await src.del(`/v1/vms/${VM}?force=true`).catch(() => {});
    await dst.del(`/v1/vms/${VM}?force=true`).catch(() => {});
  }
  return result;
}

type Host = LabState['hosts'][0];

/** The VM of a run: system disk overlay on the template (both hosts have it), data disk with used data. */
async function setupVm(src: AgentClient, dataDir: string, s: Scenario, tag: string, template: string, say: (m: string) => void): Promise<VmView['spec']> {
  const dataFile = path.join(dataDir, 'import', `data-${s.seed}-${tag}.qcow2`);
  say(`  preparing a ${Math.round(s.diskBytes / 2 ** 20)} MiB data disk with ${Math.round(s.usedBytes / 2 ** 20)} MiB used`);
  await makeDataDisk(dataFile, s, template);
  await src.post('/v1/vms', { name: VM, image: GUEST_IMAGE, memoryMiB: s.memoryMiB, disks: [{ file: dataFile }], workload: { heartbeatHz: s.heartbeatHz ?? 50, writeRate: s.writeRate, seed: s.seed, dirtyMiB: s.dirtyMiB } });
  await src.post(`/v1/vms/${VM}/start`);
  await waitFor('the guest to boot', 180_000, async () => ((await src.get<GuestStats>(`/v1/vms/${VM}/guest`)).ready ? true : undefined), { everyMs: 500 });
  await sleep(5000);
  return (await src.get<VmView>(`/v1/vms/${VM}`)).spec;
}

/**
 * After a completed migration: guest-seen downtime (largest heartbeat gap on either host and
 * across the switch) and integrity (destination disks vs the source's final disks outside the
 * post-switchover writes; the guest checker up to the last durable record before the pause).
 */
async function measureAfter(result: RunResult, o: { dst: AgentClient; h1: Host; h2: Host; spec: VmView['spec']; image: { tool: string }; s: Scenario; srcFinal: GuestStats; atSwitchover: GuestStats | null; say: (m: string) => void; contAtEpoch?: number }): Promise<void> {
  const { dst, h1, h2, spec, image, s, say } = o;
  {
    const dstStats = await waitFor('heartbeats on the destination', 60_000, async () => {
      const g = await dst.get<GuestStats>(`/v1/vms/${VM}/guest`);
      return g.heartbeats >= 20 ? g : undefined;
    });
    const srcFinal = o.srcFinal;
    const across = dstStats.firstHeartbeatAt! - srcFinal.lastHeartbeatAt!;
    const contAt = (o as { contAtEpoch?: number }).contAtEpoch;
    if (contAt) say(`  the destination guest's first heartbeat came ${dstStats.firstHeartbeatAt! - contAt} ms after cont`);
    result.guestDowntimeMs = Math.max(srcFinal.maxGapMs, across, dstStats.maxGapMs);
    say(`  heartbeat gaps: source during pre-copy ${Math.round(srcFinal.maxGapMs)} ms, across the switch ${Math.round(across)} ms, destination after ${Math.round(dstStats.maxGapMs)} ms`);
    say(`  done in ${result.totalSec!.toFixed(0)} s; guest saw a ${Math.round(result.guestDowntimeMs)} ms gap (QEMU says ${result.qemuDowntimeMs} ms); wire ${Math.round(result.wireBytesFwd! / 2 ** 20)} MiB`);

    // Integrity.
    const dirty = await dst.post<Record<string, { offset: number; length: number }[]>>(`/v1/vms/${VM}/dirty-since-switchover`);
    await dst.post(`/v1/vms/${VM}/stop`, { force: true });
    let differing = 0;
    const details: string[] = [];
    for (const d of spec.disks) {
      const a = d.file.startsWith('/') ? d.file : path.join(h1.dataDir, 'vms', VM, d.file);
      const b = path.join(h2.dataDir, 'vms', VM, `${d.id}.qcow2`);
      const n = await compareDisks(a, b, dirty[d.id] ?? []);
      differing += n;
      details.push(`${d.id}: ${n} differing 4 KiB blocks outside ${(dirty[d.id] ?? []).length} post-switchover extents`);
    }
    const durableSeq = o.atSwitchover?.lastDurableSeq ?? 0;
    const check = await checkDisk(image.tool, path.join(h2.dataDir, 'vms', VM, 'vdb.qcow2'), s.seed, durableSeq);
    result.integrity = { disksEqual: differing === 0, differingBlocks: differing, recordsOk: check.ok, durableSeq, detail: `${details.join('; ')}; ${check.ok ? check.output.split('\n').pop() : check.output.split('\n').slice(-6).join(' / ')}` };
    result.ok = differing === 0 && check.ok;
    if (!result.ok) result.error = `integrity: ${result.integrity.detail}`;
    say(`  integrity: ${result.ok ? 'OK' : 'FAILED'} (${result.integrity.detail})`);
  }
}

/** Ferry's own live migration (src/migration/), measured exactly like the native runs. */
export async function runFerry(
  lab: LabState,
  s: Scenario,
  say: (m: string) => void,
  o: { maxDowntimeMs?: number; verify?: 'full' | 'sample'; xbzrle?: boolean; cut?: { seconds: number; afterSeconds: number; flap: boolean }; onProgress?: (v: MigrationView) => Promise<void> | void; afterMigration?: (v: MigrationView, spec: VmView['spec']) => Promise<void> | void; seededAfterSec?: number } = {},
): Promise<RunResult & { view?: MigrationView }> {
  const contender = o.seededAfterSec === undefined ? 'ferry' : `ferry, h2 holds a backup ${o.seededAfterSec} s old`;
  const [h1, h2] = lab.hosts as [Host, Host];
  const src: AgentClient = labClient(h1);
  const dst: AgentClient = labClient(h2);
  const prof = getProfile(s.profile);
  const samples: Sample[] = [];
  const result: RunResult = { contender, ok: false, samples };
  const image = readImage(JSON.parse(fs.readFileSync(path.join(h1.dataDir, 'agent.json'), 'utf8')).imagesDir, GUEST_IMAGE);
  try {
    const spec = await setupVm(src, h1.dataDir, s, 'ferry', image.root, say);
    const seedStore = path.join(h2.dataDir, 'store');
    if (o.seededAfterSec !== undefined) {
      // "Last night's backup": h1 backs the VM up into h2's store, then the guest runs on.
      fs.rmSync(seedStore, { recursive: true, force: true });
      storeInit(seedStore);
      const j = await src.post<JobView>(`/v1/vms/${VM}/backups`, { store: seedStore });
      await waitFor('the seeding backup', 600_000, async () => {
        const v = await src.get<JobView>(`/v1/jobs/${j.id}`);
        if (v.state === 'failed') throw new Error(`seeding backup: ${v.error?.message}`);
        return v.state === 'done' ? v : undefined;
      });
      say(`  backed up into h2's store; the guest runs ${o.seededAfterSec} s more before the migration`);
      await sleep(o.seededAfterSec * 1000);
    }
    await relayCommand(lab, { op: 'reset' });
    const t0 = Date.now();
    say(`  ${contender}: migrating h1 → h2 (${prof.description})`);
    const started = await src.post<MigrationView>(`/v1/vms/${VM}/migrate`, { to: h2.name, keepSource: true, timeoutSec: s.timeoutSec, maxDowntimeMs: o.maxDowntimeMs ?? 300, verify: o.verify ?? 'full', ...(o.xbzrle === undefined ? {} : { xbzrle: o.xbzrle }) });
    const cut = o.cut ?? prof.outage;
    if (cut) {
      await labCut(lab.name, { seconds: cut.seconds, flap: cut.flap, inSeconds: cut.afterSeconds });
      say(`  outage of ${cut.seconds} s scheduled at t+${cut.afterSeconds} s${cut.flap ? ' (flap)' : ''}`);
    }
    let lastLog = 0;
    const view = await waitFor<MigrationView>('the migration', s.timeoutSec * 1000 + 60_000, async () => {
      const v = await src.get<MigrationView>(`/v1/migrations/${started.id}`);
      const w = wire(await relayCommand(lab, { op: 'status' }));
      const t = (Date.now() - t0) / 1000;
      samples.push({ t, wireFwd: w.fwd, wireRev: w.rev, phase: v.phase });
      await o.onProgress?.(v);
      if (t - lastLog >= 30) {
        lastLog = t;
        say(`  t+${t.toFixed(0)}s ${progressLine(v)}`);
      }
      return v.endedAt ? v : undefined;
    }, { everyMs: 500, retryErrors: false });
    const relayEnd = await relayCommand<RelayStatus>(lab, { op: 'status' });
    const w = wire(relayEnd);
    (result as RunResult & { view?: MigrationView }).view = view;
    if (view.phase !== 'done') throw new Error(view.error ? `[${view.error.code}] ${view.error.message}` : `ended in phase ${view.phase}`);
    await o.afterMigration?.(view, spec);
    result.totalSec = view.result!.totalMs / 1000;
    result.qemuDowntimeMs = view.result!.qemuDowntimeMs;
    result.wireBytesFwd = w.fwd;
    result.wireBytesRev = w.rev;
    result.linkLimitSec = ((w.fwd + w.rev) * 8) / prof.link.rateBps;
    // Both kinds of re-sending count: frames queued again after their connection died, and copies
    // of frames presumed lost (transport/session.ts `rescue`, `probeTail`, `copies: 2`).
    const rescued = view.wire.rescuedFrames ?? 0;
    result.resentPct = view.wire.framesSent ? (100 * (view.wire.resentFrames + rescued)) / view.wire.framesSent : 0;
    say(`  switchover pause as the source saw it: ${view.result!.pausedMs} ms; re-sent ${result.resentPct.toFixed(2)} % of frames (${view.wire.resentFrames} after a lost connection, ${rescued} copies of frames presumed lost: ${view.wire.probedFrames ?? 0} at a burst's tail, ${view.wire.doubledFrames ?? 0} urgent control messages sent twice); from QEMU's first pass to the end ${view.wire.parityFrames ?? 0} parity frames (${((view.wire.parityBytes ?? 0) / 1024).toFixed(1)} KiB), ${view.result!.switchover?.destFramesRebuilt ?? 0} frames rebuilt from them`);
    const sw = view.result!.switchover ?? {};
    say(`  switchover timeline (ms after the pause): ${JSON.stringify(sw)}; the source guest's last heartbeat came ${sw.pausedAtEpoch! - (view.atSwitchover?.lastHeartbeatAt ?? 0)} ms before the pause`);
    say(`  ${relayLateness(relayEnd, sw.pausedAtEpoch, sw.destRunningMs)}`);
    await measureAfter(result, { dst, h1, h2, spec, image, s, srcFinal: view.final!, atSwitchover: view.atSwitchover, say, contAtEpoch: sw.destContAtEpoch });
  } catch (e) {
    result.ok = false;
    result.error = (e as Error).message;
    say(`  ${contender} FAILED: ${result.error}`);
  } finally {
    await src.del(`/v1/vms/${VM}?force=true`).catch(() => {});
    await dst.del(`/v1/vms/${VM}?force=true`).catch(() => {});
    if (o.seededAfterSec !== undefined) fs.rmSync(path.join(h2.dataDir, 'store'), { recursive: true, force: true });
  }
  return result;
}

export interface BenchReport {
  scenario: Scenario;
  startedAt: string;
  host: { cpus: number; kernel: string };
  runs: RunResult[];
}

export async function benchMigrate(s: Scenario, o: { variants: string[]; ferry: boolean; seededAfterSec?: number; say: (m: string) => void }): Promise<BenchReport> {
  const report: BenchReport = { scenario: s, startedAt: new Date().toISOString(), host: { cpus: os.cpus().length, kernel: os.release() }, runs: [] };
  for (const variant of o.variants) {
    await labDown('bench', { force: true });
    const lab = await labUp({ name: 'bench', base: '10.220', profile: s.profile, seed: s.seed, cc: s.cc, scheduleOutage: false, say: () => {} });
    try {
      report.runs.push(await runNative(lab, s, variant, o.say));
    } finally {
      await labDown('bench', { force: true });
    }
  }
  if (o.ferry) {
    await labDown('bench', { force: true });
    const lab = await labUp({ name: 'bench', base: '10.220', profile: s.profile, seed: s.seed, cc: s.cc, scheduleOutage: false, say: () => {} });
    try {
      report.runs.push(await runFerry(lab, s, o.say));
      if (o.seededAfterSec !== undefined) report.runs.push(await runFerry(lab, s, o.say, { seededAfterSec: o.seededAfterSec }));
    } finally {
      await labDown('bench', { force: true });
    }
  }
  return report;
}

/**
 * The lab's own faithfulness: packets its relay sent late (it shares the cores with both lab
 * hosts), over the run and in the switchover's pause.
 */
function relayLateness(st: RelayStatus, pausedAt?: number, runningMs?: number): string {
  const l = st.late;
  if (!l) return 'relay: no lateness figures';
  const inPause = pausedAt === undefined ? [] : l.recent.filter((x) => x.at >= pausedAt && x.at <= pausedAt + (runningMs ?? 1000));
  const max = (xs: { ms: number }[]) => Math.max(0, ...xs.map((x) => x.ms));
  return `relay: ${l.packets} packets sent > 2 ms after their time (worst ${l.maxMs.toFixed(1)} ms); in the pause ${inPause.length} (worst ${max(inPause).toFixed(1)} ms${inPause.length ? `, at ${inPause.map((x) => `${x.at - pausedAt!}+${x.ms}`).join(' ')}` : ''})`;
}
