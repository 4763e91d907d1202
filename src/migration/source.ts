// Why this file exists: the source side of Ferry's live migration — the driver of the phased
// protocol (protocol.ts has the message flow and the state diagram). One SourceMigration moves
// one running VM to one trusted peer over one transport session:
//
//   begin      local checks, dial, peer's checks (every refusal at once)
//   prepare    destination creates disks and an -incoming QEMU
//   disk       round 0, dirty rounds, whole-disk hash verification (converge.ts decides throttling)
//   ram        QEMU's stream through the transport while disk rounds continue
//   switchover QEMU paused at pre-switchover: final disk round + FINAL barrier, migrate-continue
//   confirm    destination runs: quit the source QEMU, delete the source copy
//
// Before `switchover` any failure rolls back (the VM never stopped running here). From
// `switchover` on, the VM runs here again only when the destination said it will not run it
// (`failed`, or `aborted` in answer to a query); if the destination cannot be asked, the VM
// stays paused here and the question is repeated: never on two hosts at once.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { ioThrottle, migrateCancel, migrateContinue, migrateTo, queryMigrate, ramCapabilities, ramParameters, runState, cont, type RamStatus } from '../qemu/migration-ops.js';
import type { QemuInstance } from '../qemu/instance.js';
import type { GuestStats } from '../qemu/serial.js';
import { topNodes } from '../qemu/snapshot-ops.js';
import type { Session } from '../transport/session.js';
import { sleep } from '../util/wait.js';
import type { VmSpec } from '../vm/spec.js';
import { decide, queueTarget, RAM_RATE_LINK_DOWN, RAM_RATE_OPEN, type ConvergeDecision } from './converge.js';
import { DiskSender, type DiskStats, type SourceDisk } from './disk-source.js';
import type { Journal, SourcePhase } from './journal.js';
import { Peer } from './peer.js';
import { type Control, type PreparedDisk } from './protocol.js';
import { allGroups, prepareRam, RAM_HASH, RamHashJob, releaseRam, warmUp } from './ram-hash.js';
import { readGroup, scribbleFreeRam } from './ram-verify.js';
import { RAM_CODEC_VERSION, RamEncoder } from './ram-codec.js';
import { listenForQemu, STREAM_HASH, type RamSource } from './ram-pipe.js';
import { planFiles, sendFiles, type ChainManifest } from './snapshot-chain.js';
import { startProfile } from '../util/profile.js';

/**
 * FERRY_DEBUG_MIGRATE=FILE: the RAM phase's QEMU figures and the queue, one JSON line per poll,
 * then the pause sampled every 5 ms (the destination adds its own line; ram-pipe.ts saves QEMU's
 * stream after the pause to FILE.final-stream).
 */
const DEBUG = process.env.FERRY_DEBUG_MIGRATE;

export interface MigrateOptions {
  /** trusted host name and its transport URL (ferry://host:port) */
  to: string;
  url: string;
  /** cap on this migration's wire rate, bytes/s (0 = none) */
  bandwidth: number;
  maxDowntimeMs: number;
  timeoutSec: number;
  verify: 'full' | 'sample';
  xbzrle: boolean;
  /** keep the source VM defined (stopped) with its disks after the move, as libvirt does */
  keepSource: boolean;
}

/** What the agent needs from its host to run a source migration. */
export interface SourceHost {
  hostName: string;
  qemuVersion: string;
  journal: Journal;
  dial(url: string, o: { resumeLimitMs: number; rateBytesPerSec: number }): Promise<Session>;
  vm(name: string): { spec: VmSpec; inst: QemuInstance; state: string };
  guestStats(name: string): GuestStats;
  allocatedBytes(spec: VmSpec): number[];
  nbdSocket(spec: VmSpec): string;
  ramSocket(spec: VmSpec): string;
  /** the guest-RAM file QEMU maps (cmdline.ts) */
  ramFile(spec: VmSpec): string;
  reserve(name: string): void;
  release(name: string): void;
  migratedAway(name: string, to: string, keep: boolean): Promise<void>;
  /** the VM's directory (its snapshot files are there) */
  vmDir(spec: VmSpec): string;
  /** the VM's snapshot tree, or undefined when it has none (snapshot-chain.ts) */
  chain(spec: VmSpec): Promise<ChainManifest | undefined>;
}

export interface MigrationView {
  id: string;
  vm: string;
  role: 'source';
  to: string;
  phase: SourcePhase;
  startedAt: number;
  endedAt?: number;
  error?: { code: string; message: string };
  disk: DiskStats & { total: number };
  ram: { transferred: number; remaining: number; total: number; dirtyBytesPerSec: number; cpuThrottle: number; streamBytes: number; /** the stream as the page-delta codec sent it (ram-codec.ts), before the transport's compression */ encodedBytes?: number } | null;
  wire: { sentBytes: number; framesSent: number; resentFrames: number; rescuedFrames: number; probedFrames?: number; doubledFrames?: number; parityFrames?: number; parityBytes?: number; refFrames: number; zeroFrames: number; linkBytesPerSec: number; drainBytesPerSec: number; stalls: number; connections: number; rttMs: number };
  etaSec: number | null;
  predictedDowntimeMs: number | null;
  /** a VM with snapshots: their files, copied before the live part (bytes) */
  files?: { done: number; total: number; snapshots: number };
  ioThrottleBps: number;
  note: string;
  verify: { mode: 'full' | 'sample'; groups: number; differing: number } | null;
  result?: { totalMs: number; pausedMs: number; qemuDowntimeMs?: number; switchover?: Record<string, number> };
  /** source guest probes when QEMU paused it, and at the end (for the benchmark) */
  atSwitchover: GuestStats | null;
  final: GuestStats | null;
  /** ms from the start at which each step began (where a migration's time went) */
  marks: Record<string, number>;
}

/** Members of a parity stripe in the pause (transport/parity.ts) */
const PAUSE_STRIPE = Number(process.env.FERRY_PAUSE_STRIPE) || 8;
/** parity stripes between QEMU's first pass and the pause (see the RAM loop) */
const PRE_STRIPE = 4;
const PRE_STRIPE_HOLD_MS = 20;
/** Between two disk rounds of the RAM phase (each costs QEMU ~5 QMP commands and the destination a flush). */
const RAM_DISK_GAP_MS = 50;
/** The whole-disk comparison runs beside the RAM copy when QEMU's first pass is expected to take longer (s). */
const VERIFY_ALONGSIDE_SEC = 20;
/** Below this link rate (bytes/s; 240 Mbit/s) the source hashes guest RAM alongside QEMU's last pages. */
const HASH_ALONGSIDE_BELOW = 30e6;

export class SourceMigration {
  readonly id = crypto.randomBytes(16).toString('hex');
  readonly view: MigrationView;
  private session: Session | undefined;
  private peer: Peer | undefined;
  private sender: DiskSender | undefined;
  private ramSrc: RamSource | undefined;
  private ramEncoder: RamEncoder | undefined;
  private cancelled: { reason: string; code: 'MIGRATION_CANCELLED' | 'MIGRATION_FAILED' } | null = null;
  private linkRate = 0;
  private decision: ConvergeDecision | undefined;
  private readonly t0 = Date.now();

  constructor(private readonly host: SourceHost, readonly vmName: string, private readonly o: MigrateOptions) {
    this.view = {
      id: this.id, vm: vmName, role: 'source', to: o.to, phase: 'begin', startedAt: this.t0,
      disk: { round: 0, roundDone: 0, roundTotal: 0, sentBytes: 0, initialBytes: 0, zeroBytes: 0, lastDirtyBytes: 0, dirtyRate: 0, lastRoundMs: 0, verifiedBytes: 0, mismatches: 0, total: 0 },
      ram: null, wire: { sentBytes: 0, framesSent: 0, resentFrames: 0, rescuedFrames: 0, refFrames: 0, zeroFrames: 0, linkBytesPerSec: 0, drainBytesPerSec: 0, stalls: 0, connections: 0, rttMs: 0 },
      etaSec: null, predictedDowntimeMs: null, ioThrottleBps: 0, note: '', verify: null, atSwitchover: null, final: null, marks: {},
    };
  }

  private mark(step: string): void {
    this.view.marks[step] ??= Date.now() - this.t0;
  }

  private phase(p: SourcePhase, error?: string): void {
    this.mark(p);
    this.view.phase = p;
    this.host.journal.source(this.id, this.vmName, this.o.to, p, { to: this.o.to, url: this.o.url, ...(error ? { error } : {}) });
  }

  /** Asks the migration to stop; honoured until the switchover starts. */
  cancel(reason = 'cancelled by operator', code: 'MIGRATION_CANCELLED' | 'MIGRATION_FAILED' = 'MIGRATION_CANCELLED'): boolean {
    if (['switchover', 'confirm', 'done', 'failed', 'cancelled', 'rollback'].includes(this.view.phase)) return false;
    this.cancelled = { reason, code };
    this.session?.close(reason);
    return true;
  }

  private check(): void {
    if (this.cancelled) throw new FerryError(this.cancelled.code, this.cancelled.reason);
    if (Date.now() - this.t0 > this.o.timeoutSec * 1000) throw new FerryError('TIMEOUT', `migration did not finish within ${this.o.timeoutSec} s`);
  }

  /** Runs the whole migration; resolves when it ended (view.phase says how). */
  async run(): Promise<void> {
    const { spec, inst } = this.host.vm(this.vmName);
    this.host.reserve(this.vmName);
    const sampler = setInterval(() => this.sample(), 500);
    try {
      this.phase('begin');
      await this.perform(spec, inst);
    } catch (e) {
      const fe = this.cancelled ? new FerryError(this.cancelled.code, this.cancelled.reason, { cause: e }) : e instanceof FerryError ? e : new FerryError('MIGRATION_FAILED', (e as Error).message, { cause: e });
      this.view.error = { code: fe.code, message: fe.message };
      await this.afterError(spec, inst, fe);
    } finally {
      clearInterval(sampler);
      this.sample();
      this.view.endedAt = Date.now();
      this.ramSrc?.close();
      this.ramEncoder = undefined; // its page cache is as large as guest RAM: the view outlives it
      releaseRam(this.host.ramFile(spec)); // the addon's mapping for the RAM check (ram-hash.ts)
      this.session?.close(this.view.phase === 'done' ? 'migration done' : 'migration ended');
      this.host.release(this.vmName);
    }
  }

  private async perform(spec: VmSpec, inst: QemuInstance): Promise<void> {
    const qmp = inst.qmp;
    // ── Begin ──
    const state = this.host.vm(this.vmName).state;
    if (state !== 'running') throw new FerryError('VM_NOT_RUNNING', `VM "${this.vmName}" is ${state}; only a running VM can be live-migrated`);
    this.session = await this.host.dial(this.o.url, { resumeLimitMs: this.o.timeoutSec * 1000, rateBytesPerSec: this.o.bandwidth });
    this.peer = new Peer(this.session);
    // The destination may give up at any time (its QEMU died, its disk is full): stop at once.
    this.peer.on('control', (m: Control) => {
      if (m.t === 'failed' && !['switchover', 'confirm'].includes(this.view.phase)) this.cancel(`destination failed: ${m.reason}`, 'MIGRATION_FAILED');
      // The destination found guest RAM groups that QEMU's stream left different: send ours.
      if (m.t === 'ram-fix') {
        const file = this.host.ramFile(spec);
        void (async () => {
          try {
            await this.peer!.reply(m, { t: 'ram-fixed', data: m.groups.map((g) => readGroup(file, g).toString('base64')) });
          } catch (e) {
            await this.peer!.replyError(m, e).catch(() => {});
          }
        })();
      }
    });
    const allocated = this.host.allocatedBytes(spec);
    const chain = await this.host.chain(spec);
    const begin = await this.peer.request<Extract<Control, { t: 'begin-ok' }>>({ t: 'begin', id: this.id, spec: { ...spec, disks: spec.disks.map((d, i) => ({ ...d, allocatedBytes: allocated[i] ?? d.sizeBytes })) } as VmSpec, from: this.host.hostName, qemuVersion: this.host.qemuVersion, machine: 'pc', ...(chain ? { chain } : {}) }, 60_000);
    if (begin.problems.length) throw new FerryError('MIGRATION_REFUSED', `${this.o.to} refuses the migration: ${begin.problems.join('; ')}`, { details: { problems: begin.problems } });
    this.check();

    // ── The snapshot tree's files (read-only while the migration holds the VM) ──
    if (chain) await this.sendChain(spec, chain);

    // ── Prepare ──
    this.phase('prepare');
    const prep = await this.peer.request<Extract<Control, { t: 'prepared' }>>({ t: 'prepare', id: this.id }, 120_000);
    this.check();
    // The nodes the guest's disks read through now: after a snapshot they are the overlays, not
    // the `diskN` nodes QEMU started with (those are frozen snapshot images further down).
    const nodes = await topNodes(qmp, spec.disks.length);
    // Over a snapshot chain there is no template shortcut for hashing (base-hashes.ts).
    const disks: SourceDisk[] = prep.disks.map((d: PreparedDisk, index) => ({ index, node: nodes[index]!, size: d.sizeBytes, base: d.base, ...(spec.disks[index]?.backing && !chain ? { backing: spec.disks[index]!.backing } : {}) }));
    this.view.disk.total = disks.reduce((a, d) => a + d.size, 0);

    // ── Perform: disk ──
    this.phase('disk');
    const sender = (this.sender = new DiskSender(qmp, this.peer, this.id, disks, this.host.nbdSocket(spec)));
    await sender.start();
    await sender.initialRound(() => this.sample());
    this.mark('round0-done');
    this.check();
    let verified = false;
    // The whole-disk comparison, when it runs alongside the RAM copy (settles once it is done).
    let verifying: Promise<void> | undefined;
    let verifyError: Error | undefined;
    const verify = async () => {
      this.mark('verify');
      const v = await sender.verify(this.o.verify === 'sample' ? 0.05 : undefined);
      this.mark('verified');
      this.view.marks['verify.hashMs'] = sender.verifyTimings.hashMs;
      this.view.marks['verify.waitMs'] = sender.verifyTimings.waitMs;
      this.view.verify = { mode: this.o.verify, ...v };
      verified = true;
    };
    for (;;) {
      await sender.dirtyRound(() => this.sample());
      this.check();
      const d = await this.control(qmp);
      await this.applyThrottle(qmp, spec, d.ioThrottleBps);
      if (!verified && d.startRam) {
        // Both ends hash their whole disks (seconds), the link idle meanwhile. Where QEMU's copy
        // of RAM will take far longer, the RAM phase starts now and the comparison runs beside
        // it; what it finds goes with the next dirty round, and QEMU may not pause the guest
        // before it is done (its downtime limit stays 0; were it to pause anyway, the final round
        // would wait for the comparison).
        if (this.verifyAlongsideRam(spec)) {
          verifying = verify().catch((e: Error) => void (verifyError = e));
          break;
        }
        await verify();
        continue;
      }
      if (verified && d.startRam && sender.pendingExtra() === 0) break;
    }

    // ── Perform: RAM ──
    this.phase('ram');
    const profile = startProfile(); // FERRY_PROFILE=DIR: the main thread's CPU, stopped after the switchover
    // A link outage stalls the RAM copy like the disk copy: QEMU keeps iterating into the spool
    // (ram-pipe.ts) at a paced rate, and the stream resumes when the link does. Guest RAM is
    // compared (and repaired) end to end at the switchover, which QEMU 7.2 under TCG needs
    // (docs/benchmarks.md, "Known issue").
    const ramSock = this.host.ramSocket(spec);
    // Backpressure paces QEMU (ram-pipe.ts); while the link is down QEMU trickles into the spool.
    const session = this.session;
    let linkDown = false;
    let firstPass = true;
    let firstPassDone = false;
    const gate = {
      target: () => queueTarget({ drainBytesPerSec: Math.max(this.linkRate, session.drainRate()), rttMs: session.stats.minRttMs || 50, window: session.window(), firstPass }),
      open: () => linkDown,
    };
    this.ramSrc = await listenForQemu(ramSock, session, gate);
    const caps = { xbzrle: this.o.xbzrle, autoConverge: true, noVmdesc: true };
    const params = { ...this.ramParams(this.decision!), ...(verified ? {} : { 'downtime-limit': 0 }) };
    await ramCapabilities(qmp, caps);
    await ramParameters(qmp, { ...params, 'cpu-throttle-initial': 20, 'cpu-throttle-increment': 10, ...(this.o.xbzrle ? { 'xbzrle-cache-size': 2 ** Math.floor(Math.log2(Math.min(256, Math.max(16, spec.memoryMiB / 4)))) * 2 ** 20 } : {}) });
    // Ferry's page-delta codec (ram-codec.ts): a page cache as large as guest RAM, up to 1 GiB,
    // on each side; FERRY_RAM_CODEC=0 sends QEMU's stream as it is (for comparisons).
    const codec = process.env.FERRY_RAM_CODEC === '0' ? undefined : { v: RAM_CODEC_VERSION, cacheBytes: Math.min(spec.memoryMiB, 1024) * 2 ** 20 };
    const ready = await this.peer.request<Extract<Control, { t: 'ram-ready' }>>({ t: 'ram-start', caps, params: {}, ...(codec ? { codec } : {}) }, 60_000);
    if (codec && ready.codec === codec.v) this.ramSrc.encodeWith((this.ramEncoder = new RamEncoder(codec.cacheBytes)));
    warmUp(); // the RAM check at the switchover must not wait for its threads to start
    // …nor for the pages of its mapping of guest RAM (ram-hash.ts, with the addon).
    const ramPrepared = prepareRam(this.host.ramFile(spec), spec.memoryMiB * 2 ** 20);
    await migrateTo(qmp, ramSock);
    const ramT0 = Date.now();
    let stopDisk = false;
    // QEMU's MIGRATION event says pre-switchover the moment the guest is paused; polling is the
    // fallback.
    let pausedAt = 0;
    const onEvent = (e: { event: string; data?: { status?: string } }) => {
      if (e.event === 'MIGRATION' && e.data?.status === 'pre-switchover' && !pausedAt) pausedAt = Date.now();
    };
    qmp.on('event', onEvent);
    const preSwitch = new Promise<void>((resolve) => {
      const check = setInterval(() => {
        if (pausedAt || stopDisk) {
          clearInterval(check);
          resolve();
        }
      }, 5);
    });
    // Disk rounds continue during the RAM copy, pipelined (a round does not wait for its
    // barrier's answer, only for the one MAX_UNANSWERED rounds back) and RAM_DISK_GAP_MS apart:
    // what the guest wrote since the last round crosses in the pause, and with a round every
    // ~320 ms (200 ms apart, each waiting a round trip for its answer) that was 35–47 KB of
    // wan-10's pause wire (~30 ms of link). When the switchover comes, the round in flight
    // finishes sending but does not wait for its answer: the destination keeps any block that
    // failed a barrier on its unresolved list and refuses to run the VM unless a later write
    // fixed it.
    const diskLoop = (async () => {
      while (!stopDisk) {
        await sender.dirtyRound(() => {}, false, preSwitch, true);
        if (!stopDisk) await Promise.race([sleep(RAM_DISK_GAP_MS), preSwitch]);
      }
    })();
    let lastParams = 0;
    let st: RamStatus;
    try {
      for (;;) {
        // The guest is paused: not one more QMP round trip before the switchover starts (each
        // waits behind whatever QEMU's monitor is doing; one run lost 55 ms so).
        if (pausedAt) break;
        st = await queryMigrate(qmp);
        this.view.ram = { transferred: st.transferred, remaining: st.remaining, total: st.total, dirtyBytesPerSec: st.dirtyPagesRate * st.pageSize, cpuThrottle: st.cpuThrottle, streamBytes: this.ramSrc.bytes(), ...(this.ramEncoder ? { encodedBytes: this.ramEncoder.encodedBytes } : {}) };
        if (st.status === 'pre-switchover') break;
        firstPass = st.dirtySyncCount < 2;
        if (DEBUG) fs.appendFileSync(DEBUG, `${JSON.stringify({ t: Date.now() - this.t0, sync: st.dirtySyncCount, rem: st.remaining, mbps: Math.round(st.mbps), exp: st.expectedDowntimeMs, thr: st.cpuThrottle, dirty: st.dirtyPagesRate, q: session.unackedPayload + this.ramSrc.backlog(), drain: Math.round(session.drainRate()) })}\n`);
        if (!firstPass && !firstPassDone) {
          firstPassDone = true;
          this.mark('ram-first-pass-done');
          if (DEBUG) session.trace = []; // every frame from here to the switchover's end
          // After the first pass QEMU resends what the guest dirtied: little on the wire (the link
          // is mostly idle), and the switchover can follow any iteration. A frame of it lost in
          // flight when QEMU pauses holds the pause's first pages for a round trip and the reorder
          // margin (~125 ms on wan-10) unless parity rebuilds it: so parity from here, in short
          // stripes (PRE_STRIPE members, PRE_STRIPE_HOLD_MS), which costs only idle link.
          if (process.env.FERRY_PARITY !== '0' && process.env.FERRY_PARITY_EARLY !== '0') session.protect(true, PRE_STRIPE, PRE_STRIPE_HOLD_MS);
        }
        if (st.status === 'failed' || st.status === 'cancelled') throw new FerryError('QEMU_FAILED', `QEMU's RAM migration ${st.status}: ${st.error ?? ''}`);
        this.check();
        // The link is down when nothing was acknowledged for a second: trickle first, then spool.
        const down = !session.draining(1000);
        if (down !== linkDown) {
          if (down) {
            await ramParameters(qmp, { 'max-bandwidth': RAM_RATE_LINK_DOWN });
            linkDown = true;
          } else {
            linkDown = false;
            await ramParameters(qmp, { 'max-bandwidth': RAM_RATE_OPEN });
          }
        }
        if (Date.now() - lastParams > 1000) {
          lastParams = Date.now();
          // QEMU's first pass keeps half a window queued: the link runs full, as in the bulk disk
          // copy. A short disk copy (the demo's: 4 s, still in slow start) measured it at a fifth
          // of its rate, and the pause budget, which counts the queue at that rate, fell to its
          // floor: QEMU got a 20 ms limit and the guest its CPU throttled to 99 % for 20 s.
          if (firstPass && !linkDown) this.linkRate = Math.max(this.linkRate, session.drainRate());
          const d = await this.control(qmp, (Date.now() - ramT0) / 1000, { queueBytes: gate.target(), linkDown });
          if (DEBUG) fs.appendFileSync(DEBUG, `${JSON.stringify({ t: Date.now() - this.t0, link: Math.round(this.linkRate), limit: d.downtimeLimitMs, predicted: d.predictedDowntimeMs })}\n`);
          if (pausedAt) break;
          if (verifyError) throw verifyError;
          await ramParameters(qmp, { 'downtime-limit': verified ? d.downtimeLimitMs : 0, 'throttle-trigger-threshold': d.throttleTrigger });
          if (pausedAt) break;
          await this.applyThrottle(qmp, spec, d.ioThrottleBps);
        }
        await Promise.race([sleep(100), diskLoop, preSwitch]);
      }
    } catch (e) {
      stopDisk = true;
      await diskLoop.catch(() => {});
      throw e;
    } finally {
      qmp.off('event', onEvent);
    }

    // ── Switchover (the guest is paused by QEMU) ──
    if (!pausedAt) pausedAt = Date.now();
    ramPrepared?.cancel(); // long done, unless the pause came within its first milliseconds
    stopDisk = true;
    const timings: Record<string, number> = { pausedAt, detectedAt: Date.now() };
    profile.mark('detected');
    const diskStepAtPause = sender.roundStep;
    sender.switching = true;
    // From here a round trip costs more than bytes: every few frames go out with their parity on
    // another connection, so a segment lost in one TCP connection costs the destination no round
    // trip of loss recovery (transport/parity.ts; on wan-10 with the pause's queue one is ~250 ms).
    // A stripe closes at PAUSE_STRIPE members, or when QEMU's stream has ended (below): parity
    // costs ~1/k of the pause's bytes, and a member lost anywhere is rebuilt by the time the
    // last bytes are in (a stripe closed 20 ms after its first member, as in bulk transfers,
    // took 3–4 members of the pause's ~8 KB messages: a third more bytes on the link).
    if (process.env.FERRY_PARITY !== '0') session.protect(true, PAUSE_STRIPE, 1000); // FERRY_PARITY=0: off, for comparisons
    // What was queued when QEMU paused the guest crosses during the pause, before the last pages.
    const queuedAtPause = session.unackedPayload + this.ramSrc.backlog();
    const wireAtPause = session.stats.wireBytesSent;
    const streamAtPause = this.ramSrc.bytes() + this.ramSrc.backlog();
    const encodedAtPause = this.ramEncoder?.encodedBytes ?? 0;
    // FERRY_DEBUG_MIGRATE: the pause sampled every 5 ms (ms, stream bytes read, wire bytes sent,
    // queue, frames copied, their bytes, tail probes among them, parity frames, their bytes).
    const samples: number[][] = [];
    const sampler = DEBUG ? setInterval(() => samples.push([Date.now() - pausedAt, this.ramSrc!.bytes() + this.ramSrc!.backlog() - streamAtPause, session.stats.wireBytesSent - wireAtPause, session.unackedPayload, session.stats.framesRescued, session.stats.rescuedBytes, session.stats.framesProbed, session.stats.parityFrames, session.stats.parityBytes]), 5) : undefined;
    // Guest RAM no longer changes (QEMU stopped the vCPUs and drained I/O before it paused), so
    // its hash for the destination's check may start now. On a WAN link the final disk round
    // and QEMU's last pages wait for the link, not the cores: one thread hashes alongside them
    // (measured on wan-10: the hash ended 16–48 ms after the stream instead of 58–115, the
    // stream no later; two threads alongside delayed it 35–120 ms; wan-100: 2 ms after the
    // stream instead of 130). On a LAN they wait for the cores: the hash holds until they are
    // out (lan: 262 and 323 ms guest-seen, against 385 with a thread alongside). Then it runs
    // on both threads. Either way it holds until `migrate-continue` has gone: alongside the
    // final disk round's QMP steps (disable the bitmap, add the exports) they took 8–20 ms
    // instead of 4–6, and `migrate-continue` went 27–30 ms after the pause instead of 12–21
    // (wan-10, 4 and 6 runs), the link idle meanwhile. FERRY_HASH_ALONGSIDE=N: N threads
    // alongside, whatever the link (for comparisons).
    const ramFile = this.host.ramFile(spec);
    // Fault injection for the repair test: FERRY_FAULT=corrupt-ram changes 3 MiB of the paused
    // guest's free (zero) RAM behind QEMU's back, as its missed dirty tracking leaves pages.
    if (process.env.FERRY_FAULT === 'corrupt-ram' && fs.existsSync(ramFile)) scribbleFreeRam(ramFile, spec.memoryMiB * 2 ** 20, 3);
    // Cancelled when this scope ends: a job left holding would keep the hashing threads.
    using ramHash = fs.existsSync(ramFile) ? new RamHashJob(ramFile, allGroups(spec.memoryMiB * 2 ** 20)) : undefined;
    const alongside = process.env.FERRY_HASH_ALONGSIDE ? Number(process.env.FERRY_HASH_ALONGSIDE) : this.linkRate > 0 && this.linkRate < HASH_ALONGSIDE_BELOW ? 1 : 0;
    ramHash?.width(0);
    this.phase('switchover');
    timings.journaledAt = Date.now();
    this.view.atSwitchover = this.host.guestStats(this.vmName);
    await diskLoop;
    await verifying; // long done, unless QEMU paused the guest before the comparison ended
    if (verifyError) throw verifyError;
    timings.diskLoopDoneAt = Date.now();
    const { barrier: finalN, sent: finalBytes } = await sender.dirtyRound(() => {}, true);
    timings.finalReadAt = Date.now();
    await sender.release(); // every read is done: nothing may hold the disks when QEMU inactivates them
    this.ramSrc!.ungate();
    await this.peer.send({ t: 'final', n: finalN }, { urgent: true });
    const ramHashLeft = ramHash?.remaining ?? 0;
    const outcome = this.peer.next((m): m is Extract<Control, { t: 'running' | 'failed' }> => m.t === 'running' || m.t === 'failed');
    await migrateContinue(qmp);
    timings.continuedAt = Date.now();
    ramHash?.width(alongside);
    // The RAM stream is checked end to end: the destination compares it before it runs the VM.
    const ramSrc = this.ramSrc!;
    await Promise.race([ramSrc.ended, outcome]);
    session.closeStripe();
    timings.ramEndedAt = Date.now();
    // The whole stream, as it was and as the codec sent it (the RAM loop's last sample predates the pause).
    if (this.view.ram) this.view.ram = { ...this.view.ram, streamBytes: ramSrc.bytes(), ...(this.ramEncoder ? { encodedBytes: this.ramEncoder.encodedBytes } : {}) };
    const wireAtRamEnd = session.stats.wireBytesSent;
    if (ramSrc.digest()) {
      ramHash?.width(2);
      const groups = await ramHash?.done.catch(() => undefined);
      timings.ramHashedAt = Date.now();
      await this.peer.send({ t: 'ram-end', bytes: ramSrc.bytes(), stream: ramSrc.digest(), streamHash: STREAM_HASH, ...(groups ? { groups: groups.toString('base64'), groupHash: RAM_HASH } : {}) }, { urgent: true });
    }
    const answer = await outcome;
    profile.mark('answered');
    profile.stop('source');
    session.protect(false);
    clearInterval(sampler);
    if (DEBUG) fs.appendFileSync(DEBUG, `${JSON.stringify({ side: 'source', diskStepAtPause, cpu: this.ramSrc!.cpuSincePause(), pause: samples, pausedAt, trace: session.trace?.filter((e) => (e[1] as number) > pausedAt - 400) })}\n`);
    if (answer.t === 'failed') throw new FerryError('MIGRATION_FAILED', `destination could not take over: ${answer.reason}`);

    // ── Confirm ──
    this.phase('confirm');
    const q = await queryMigrate(qmp).catch(() => undefined);
    this.view.final = this.host.guestStats(this.vmName);
    // Where the pause went, in ms from the moment QEMU paused the guest (both hosts' clocks).
    const rel = (x?: number) => (x ? x - pausedAt : -1);
    const dt = answer.timings ?? {};
    this.view.result = {
      totalMs: Date.now() - this.t0,
      pausedMs: answer.at - pausedAt,
      ...(q?.downtimeMs !== undefined ? { qemuDowntimeMs: q.downtimeMs } : {}),
      switchover: { pausedAtEpoch: pausedAt, destContAtEpoch: dt.contAt ?? 0, ...Object.fromEntries(Object.entries(sender.finalTimings).map(([k, v]) => [`final.${k}`, v])), finalDiskBytes: finalBytes, queuedAtPause, ramStreamAfterPause: ramSrc.bytes() - streamAtPause, ...(this.ramEncoder ? { ramEncodedAfterPause: this.ramEncoder.encodedBytes - encodedAtPause } : {}), wireAfterPause: wireAtRamEnd - wireAtPause, ramEndedMs: rel(timings.ramEndedAt), destRamLastBytesMs: rel(dt.ramLastBytesAt), detectedMs: rel(timings.detectedAt), journaledMs: rel(timings.journaledAt), diskLoopDoneMs: rel(timings.diskLoopDoneAt), finalDiskReadMs: rel(timings.finalReadAt), continuedMs: rel(timings.continuedAt), destFinalMs: rel(dt.finalAt), destDiskVerifiedMs: rel(dt.diskVerifiedAt), destRamCompletedMs: rel(dt.ramCompletedAt), destRamCheckedMs: rel(dt.ramCheckedAt), destRamEndMs: rel(dt.ramEndAt), ramHashedMs: rel(timings.ramHashedAt), ramHashLeftAtContinue: ramHashLeft, ramZeroMiB: ramHash?.zeroGroups ?? -1, ramRepairedMiB: dt.ramRepairedMiB ?? 0, destFramesRebuilt: dt.framesRebuilt ?? 0, ...(dt.ramHashedInPauseMiB !== undefined ? { destRamHashedInPauseMiB: dt.ramHashedInPauseMiB } : {}), destRunningMs: rel(dt.contAt) },
    };
    await this.host.migratedAway(this.vmName, this.o.to, this.o.keepSource);
    await this.peer.send({ t: 'confirm' }).catch(() => {});
    await this.session.flush().catch(() => {});
    this.phase('done');
  }

  /** Sends the snapshot files the destination lacks, and waits until it has them all, verified. */
  private async sendChain(spec: VmSpec, chain: ChainManifest): Promise<void> {
    const want = await this.peer!.request<Extract<Control, { t: 'files-want' }>>({ t: 'files', files: chain.files }, 120_000);
    const files = chain.files.filter((f) => want.names.includes(f.name));
    const plan = await planFiles(this.host.vmDir(spec), files, want.partial);
    const total = plan.reduce((a, p) => a + p.file.size - p.from, 0);
    const resumed = plan.filter((p) => p.from > 0).length;
    const view = (this.view.files = { done: 0, total, snapshots: chain.snapshots.length });
    this.view.note = `copying the files of ${chain.snapshots.length} snapshot(s) (${chain.files.length - files.length} of ${chain.files.length} already at the destination${resumed ? `, ${resumed} resumed where a previous attempt stopped` : ''})`;
    await sendFiles(this.session!, this.host.vmDir(spec), plan, (n) => {
      view.done += n;
      this.check();
    });
    await this.peer!.request({ t: 'files-done' }, this.o.timeoutSec * 1000);
    this.view.note = `${chain.snapshots.length} snapshot(s) copied: ${Math.round(total / 2 ** 20)} MiB`;
    this.check();
  }

  /**
   * Whether the whole-disk comparison runs beside the RAM copy rather than before it: when
   * QEMU's first pass alone (a quarter of guest RAM on the wire, at the measured link rate) takes
   * over VERIFY_ALONGSIDE_SEC. FERRY_VERIFY_ALONGSIDE=0|1 decides instead (for comparisons).
   */
  private verifyAlongsideRam(spec: VmSpec): boolean {
    const env = process.env.FERRY_VERIFY_ALONGSIDE;
    if (env === '0' || env === '1') return env === '1';
    return this.linkRate > 0 && (spec.memoryMiB * 2 ** 20) / 4 / this.linkRate > VERIFY_ALONGSIDE_SEC;
  }

  private ramParams(d: ConvergeDecision): Record<string, number> {
    return { 'downtime-limit': d.downtimeLimitMs, 'max-bandwidth': RAM_RATE_OPEN, 'throttle-trigger-threshold': d.throttleTrigger };
  }

  /** Feeds the controller with what was measured; keeps its decision for the view. */
  private async control(qmp: QemuInstance['qmp'], secondsInRam?: number, pacing?: { queueBytes: number; linkDown: boolean }): Promise<ConvergeDecision> {
    const s = this.session!;
    const st = s.stats;
    const ratio = (ch: number) => {
      const c = st.channels[ch];
      return c && c.reduced > 0 ? c.raw / c.reduced : 1;
    };
    const ram = secondsInRam !== undefined ? await queryMigrate(qmp) : undefined;
    const d = decide({
      linkBytesPerSec: this.linkRate || s.drainRate() || 1e6,
      rttMs: st.minRttMs || 50,
      maxDowntimeMs: this.o.maxDowntimeMs,
      diskRatio: ratio(3),
      ramRatio: ratio(2),
      diskDirtyRate: this.sender!.stats.dirtyRate,
      diskLastDirtyBytes: this.sender!.stats.lastDirtyBytes,
      rounds: this.sender!.stats.round,
      ...(ram ? { ram: { remaining: ram.remaining, dirtyBytesPerSec: ram.dirtyPagesRate * ram.pageSize, secondsInRam: secondsInRam! } } : {}),
      ...(pacing ? { queueBytes: pacing.queueBytes, ...(pacing.linkDown ? {} : { drainNowBytesPerSec: s.drainRate() }) } : {}),
    });
    this.decision = d;
    this.view.predictedDowntimeMs = d.predictedDowntimeMs;
    this.view.note = d.note;
    return d;
  }

  private async applyThrottle(qmp: QemuInstance['qmp'], spec: VmSpec, bps: number): Promise<void> {
    if (bps === this.view.ioThrottleBps) return;
    for (let i = 0; i < spec.disks.length; i++) await ioThrottle(qmp, `vd${i}`, bps);
    this.view.ioThrottleBps = bps;
  }

  /** Refreshes the view's rates, ETA and wire figures. */
  private sample(): void {
    const s = this.session;
    if (this.sender) this.view.disk = { ...this.sender.stats, total: this.view.disk.total };
    if (!s) return;
    const drain = s.drainRate();
    // The link's capacity: the best drain seen while the window was full (bulk copy).
    if (this.view.phase === 'disk' && drain > this.linkRate) this.linkRate = drain;
    this.view.wire = { sentBytes: s.stats.wireBytesSent, framesSent: s.stats.framesSent, refFrames: s.stats.refFrames, zeroFrames: s.stats.zeroFrames, resentFrames: s.stats.framesResent, rescuedFrames: s.stats.framesRescued, probedFrames: s.stats.framesProbed, doubledFrames: s.stats.framesDoubled, parityFrames: s.stats.parityFrames, parityBytes: s.stats.parityBytes, linkBytesPerSec: this.linkRate, drainBytesPerSec: drain, stalls: s.stats.stalls, connections: s.connections, rttMs: s.stats.minRttMs };
    const disk = this.view.disk;
    const rate = Math.max(this.linkRate, drain, 1);
    const diskRatio = s.stats.channels[3] && s.stats.channels[3].reduced ? s.stats.channels[3].raw / s.stats.channels[3].reduced : 1;
    if (this.view.phase === 'disk') this.view.etaSec = Math.round(((disk.roundTotal - disk.roundDone) / diskRatio + 2 * (this.view.ram?.total ?? 0) / 20) / rate);
    else if (this.view.phase === 'ram' && this.view.ram) this.view.etaSec = Math.round(this.view.ram.remaining / 20 / rate + 1);
    else if (this.view.phase === 'switchover' || this.view.phase === 'confirm') this.view.etaSec = 0;
  }

  /** Failure handling: roll back before the switchover; after it, resolve the doubt first. */
  private async afterError(spec: VmSpec, inst: QemuInstance, e: FerryError): Promise<void> {
    const qmp = inst.qmp;
    const atOrAfterSwitch = ['switchover', 'confirm'].includes(this.view.phase);
    if (this.view.phase === 'confirm') {
      // The destination runs the VM: finish the source side whatever failed here.
      await this.host.migratedAway(this.vmName, this.o.to, this.o.keepSource).catch(() => {});
      this.phase('done');
      return;
    }
    if (atOrAfterSwitch && e.message.startsWith('destination could not take over') === false) {
      // The destination's answer was lost: ask it until it says (the VM stays paused here).
      const verdict = await this.askDestination();
      if (verdict === 'running') {
        this.view.final = this.host.guestStats(this.vmName);
        await this.host.migratedAway(this.vmName, this.o.to, this.o.keepSource).catch(() => {});
        this.view.error = undefined;
        this.phase('done');
        return;
      }
    }
    this.phase('rollback', e.message);
    await rollbackSource(qmp, spec, this.sender);
    this.phase(e.code === 'MIGRATION_CANCELLED' ? 'cancelled' : 'failed', e.message);
    if (this.peer && !this.session?.isClosed()) await this.peer.send({ t: 'abort', reason: e.message }).catch(() => {});
    // If the link was down, the abort never arrived: ask on a fresh session once it is back
    // (a query from a new session makes the destination abort and clean up).
    if (this.peer) void askDestination(this.host, this.o.url, this.id, () => {}, 8).catch(() => {});
  }

  /** Repeats `query` on fresh sessions until the destination gives a definite answer. */
  private async askDestination(): Promise<'running' | 'not-running'> {
    return askDestination(this.host, this.o.url, this.id, (m) => (this.view.note = m));
  }
}

/**
 * Asks the destination for migration `id`'s phase, on fresh sessions, until it answers. `running`
 * or `done` means it runs the VM; anything else (aborted, unknown) means it never will.
 */
export async function askDestination(host: Pick<SourceHost, 'dial'>, url: string, id: string, note: (m: string) => void, maxAttempts = Infinity): Promise<'running' | 'not-running'> {
  for (let attempt = 1; ; attempt++) {
    try {
      const s = await host.dial(url, { resumeLimitMs: 30_000, rateBytesPerSec: 0 });
      try {
        const peer = new Peer(s);
        const r = await peer.request<Extract<Control, { t: 'state' }>>({ t: 'query', id }, 60_000);
        if (r.phase === 'running' || r.phase === 'done') {
          // It runs there: the source copy is finished with (the caller removes it); say so.
          await peer.send({ t: 'confirm', id }).catch(() => {});
          await s.flush().catch(() => {});
          return 'running';
        }
        return 'not-running';
      } finally {
        s.close('query answered');
      }
    } catch (e) {
      if (attempt >= maxAttempts) throw e;
      note(`destination unreachable (${(e as Error).message}); the VM stays paused here until it answers (attempt ${attempt})`);
      await sleep(Math.min(30_000, 1000 * attempt));
    }
  }
}

/** Puts the source VM back the way it was: no migration, no throttle, no bitmaps, running. */
export async function rollbackSource(qmp: QemuInstance['qmp'], spec: VmSpec, sender?: DiskSender): Promise<void> {
  await migrateCancel(qmp);
  for (let i = 0; i < 100; i++) {
    const s = await queryMigrate(qmp).catch(() => undefined);
    if (!s || !['active', 'pre-switchover', 'cancelling', 'device', 'setup'].includes(s.status)) break;
    await sleep(50);
  }
  if (sender) await sender.cleanup().catch(() => {});
  for (let i = 0; i < spec.disks.length; i++) await ioThrottle(qmp, `vd${i}`, 0).catch(() => {});
  const rs = await runState(qmp).catch(() => 'unknown');
  if (rs !== 'running') await cont(qmp).catch(() => {});
}
