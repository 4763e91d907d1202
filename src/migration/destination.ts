// Why this file exists: the destination side of Ferry's live migration. It answers one transport
// session from a trusted source agent: checks (`begin`), creates the VM with an -incoming QEMU
// (`prepare`), applies disk records (disk-dest.ts), feeds QEMU's RAM stream, and at the FINAL
// barrier verifies the last disk delta, waits for QEMU to finish loading, journals `running`,
// resumes the guest and tells the source. Anything that ends the session before that aborts:
// the QEMU is killed and the partial disks are cached for a retry. It never runs the VM unless
// every disk block verified and QEMU loaded the whole state.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FerryError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { announceSelf, bitmapAdd, cont, exportAdd, migrateIncoming, nbdServerStart, nbdServerStop, queryMigrate, ramCapabilities, ramParameters } from '../qemu/migration-ops.js';
import type { QemuInstance } from '../qemu/instance.js';
import type { ChunkIndex } from '../storage/chunk-index.js';
import type { Session } from '../transport/session.js';
import { sleep } from '../util/wait.js';
import type { VmSpec } from '../vm/spec.js';
import { DiskReceiver } from './disk-dest.js';
import type { DestPhase, Journal } from './journal.js';
import { Peer } from './peer.js';
import { CH, type Control, type PreparedDisk } from './protocol.js';
import { hashRam, RAM_GROUP, RAM_HASH, releaseRam, warmUp } from './ram-hash.js';
import { differingGroups, rehashInto, writeGroup } from './ram-verify.js';
import { RAM_CODEC_VERSION, RamDecoder } from './ram-codec.js';
import { connectToQemu, STREAM_HASH, type RamSink } from './ram-pipe.js';
import { RamTracker, type RamTrackStats } from './ram-track.js';
import { chainProblems, FileReceiver, type ChainManifest } from './snapshot-chain.js';
import { startProfile, type Profile } from '../util/profile.js';

/** FERRY_DEBUG_MIGRATE=FILE: the switchover as this side saw it, one JSON line (source.ts writes its own) */
const DEBUG = process.env.FERRY_DEBUG_MIGRATE;
/**
 * Fault injection for the stream check: FERRY_FAULT=corrupt-ram-stream flips a bit in the middle
 * of the 100th RAM message as decoded, as a codec or transport fault would.
 */
const CORRUPT_STREAM = process.env.FERRY_FAULT === 'corrupt-ram-stream';

export interface DestHost {
  hostName: string;
  qemuVersion: string;
  dataDir: string;
  journal: Journal;
  vmExists(name: string): boolean;
  imageProblem(spec: VmSpec): string | null;
  /** `chain`: the VM's snapshot tree, whose files wait in `cacheDir` (snapshot-chain.ts) */
  createIncoming(spec: VmSpec, from: string, cacheDir: string, chain?: ChainManifest): Promise<{ inst: QemuInstance; bases: PreparedDisk['base'][]; spec: VmSpec }>;
  nbdSocket(spec: VmSpec): string;
  ramSocket(spec: VmSpec): string;
  /** the guest-RAM file QEMU maps (cmdline.ts) */
  ramFile(spec: VmSpec): string;
  activate(name: string, from: string): void;
  /** chunk indexes of the templates this VM's disks are based on (content this host holds) */
  chunkIndexes(spec: VmSpec): Promise<ChunkIndex[]>;
  discard(name: string, cacheDir: string): Promise<void>;
  /** one migration per session id at a time: the registry of live destination handlers */
  live: Map<string, DestinationMigration>;
}

const cacheDirFor = (dataDir: string, uuid: string) => path.join(dataDir, 'migration-cache', uuid);

/** Serves one session: `query` or one migration from `begin` to `confirm`. */
export function serveSession(host: DestHost, session: Session, peerName: string): void {
  const peer = new Peer(session);
  let mig: DestinationMigration | undefined;
  peer.on('control', (m: Control) => {
    if (m.t === 'query') {
      void answerQuery(host, peer, m);
    } else if (m.t === 'confirm' && m.id && !mig) {
      // A source that recovered after a crash confirms on a new session.
      const row = host.journal.get(m.id, 'destination');
      if (row?.phase === 'running') host.journal.dest(m.id, row.vm, row.peer, 'done', row.data);
    } else if (m.t === 'begin') {
      if (mig) return void peer.replyError(m, new FerryError('INVALID_ARGUMENT', 'one migration per session'));
      mig = new DestinationMigration(host, peer, m.id, m.spec, m.from || peerName);
      host.live.set(m.id, mig);
      void mig.begin(m);
    } else if (mig) {
      mig.onControl(m);
    }
  });
  session.on('message', (ch: number, msg: Buffer) => mig?.onData(ch, msg));
  peer.on('closed', (why: string) => void mig?.onClosed(why));
}

async function answerQuery(host: DestHost, peer: Peer, m: Extract<Control, { t: 'query' }>): Promise<void> {
  const live = host.live.get(m.id);
  // A source that asks on a new session has lost the old one (it crashed or gave up): a
  // migration still before `finishing` here can never complete — abort it now.
  if (live) await live.settleForQuery();
  const row = host.journal.get(m.id, 'destination');
  await peer.reply(m, { t: 'state', phase: row?.phase ?? null });
}

export class DestinationMigration {
  phase: DestPhase | 'begin' = 'begin';
  private inst: QemuInstance | undefined;
  private nbds: NbdClient[] = [];
  private profile: Profile = { mark: () => {}, stop: () => {} };
  private receiver: DiskReceiver | undefined;
  private ram: RamSink | undefined;
  private ramBacklog: Buffer[] = [];
  /** which guest-RAM groups the stream touched, and their early hashes (ram-track.ts) */
  private ramTrack: RamTracker | undefined;
  /** set when the source's RAM stream comes page-delta encoded (ram-codec.ts) */
  private ramDecoder: RamDecoder | undefined;
  private ramBroken = false;
  private ramMessages = 0;
  private ramTrackTimer: NodeJS.Timeout | undefined;
  private ramTrackStats: RamTrackStats | undefined;
  /** FERRY_DEBUG_MIGRATE: RAM messages after the `final` barrier came ([ms after it, bytes]) */
  private finalAt = 0;
  private ramEndAt = 0;
  private ramAfterFinal: number[][] = [];
  private decodeMsAfterFinal = 0;
  private ramEnd: Extract<Control, { t: 'ram-end' }> | undefined;
  private indexes: ChunkIndex[] = [];
  /** 1 MiB groups of guest RAM that QEMU's stream left different and that were repaired */
  private ramRepairedGroups = 0;
  private finishing: Promise<void> | undefined;
  private spec: VmSpec;
  /** set when the source is known gone: finishing gives up unless QEMU already completed */
  private giveUp = false;
  /** this migration created the VM here (so an abort may remove it) */
  private created = false;
  /** the VM's snapshot tree, and its files as they arrive (snapshot-chain.ts) */
  private chain: ChainManifest | undefined;
  private files: FileReceiver | undefined;

  constructor(private readonly host: DestHost, private readonly peer: Peer, readonly id: string, spec: VmSpec, private readonly from: string) {
    this.spec = spec;
  }

  private journal(p: DestPhase, data: Record<string, unknown> = {}): void {
    this.phase = p;
    this.host.journal.dest(this.id, this.spec.name, this.from, p, { uuid: this.spec.uuid, ...data });
  }

  /** Begin: every reason to refuse, at once. */
  async begin(m: Extract<Control, { t: 'begin' }>): Promise<void> {
    const problems: string[] = [];
    const s = m.spec;
    if (this.host.vmExists(s.name)) problems.push(`a VM named "${s.name}" already exists on ${this.host.hostName}`);
    const img = this.host.imageProblem(s);
    if (img) problems.push(img);
    if (m.qemuVersion.split(' ')[3]?.split('.').slice(0, 2).join('.') !== this.host.qemuVersion.split(' ')[3]?.split('.').slice(0, 2).join('.')) {
      problems.push(`QEMU versions differ: source "${m.qemuVersion}", destination "${this.host.qemuVersion}"`);
    }
    if (m.machine !== 'pc') problems.push(`machine type ${m.machine} is not supported here`);
    if (m.chain) {
      this.chain = m.chain;
      problems.push(...chainProblems(m.chain));
    }
    const need = s.disks.reduce((a, d) => a + ((d as { allocatedBytes?: number }).allocatedBytes ?? d.sizeBytes), 0) + (m.chain?.files.reduce((a, f) => a + f.size, 0) ?? 0);
    const st = fs.statfsSync(this.host.dataDir);
    const free = st.bavail * st.bsize;
    if (free < need * 1.05 + (64 << 20)) problems.push(`not enough disk space in ${this.host.dataDir}: ${Math.round(free / 2 ** 20)} MiB free, ${Math.round(need / 2 ** 20)} MiB needed`);
    if (s.memoryMiB * 2 ** 20 > os.totalmem() - (256 << 20)) problems.push(`not enough memory: the VM needs ${s.memoryMiB} MiB, the host has ${Math.round(os.totalmem() / 2 ** 20)} MiB`);
    if (problems.length) host_forget(this.host, this.id);
    await this.peer.reply(m, { t: 'begin-ok', problems });
  }

  onControl(m: Control): void {
    switch (m.t) {
      case 'prepare':
        void this.prepare(m);
        break;
      case 'files':
      case 'files-done':
        void this.onFiles(m);
        break;
      case 'verify':
        void (async () => {
          try {
            await this.peer.reply(m, await this.receiver!.hashes(m.req));
          } catch (e) {
            await this.peer.replyError(m, e);
          }
        })();
        break;
      case 'ram-start':
        void this.ramStart(m);
        break;
      case 'final':
        this.finishing = this.finish(m.n);
        break;
      case 'ram-end':
        this.ramEnd = m;
        this.ramEndAt = Date.now();
        break;
      case 'confirm':
        for (const i of this.indexes.splice(0)) i.close?.();
        this.journal('done');
        host_forget(this.host, this.id);
        break;
      case 'abort':
        void this.abort(m.reason);
        break;
      default:
        break;
    }
  }

  onData(ch: number, msg: Buffer): void {
    if (ch === CH.DISK) {
      try {
        this.receiver?.push(msg);
      } catch (e) {
        void this.fail(`bad disk record: ${(e as Error).message}`);
      }
    } else if (ch === CH.RAM) {
      if (this.ram) this.writeRam(msg);
      else this.ramBacklog.push(msg);
    } else if (ch === CH.FILE) {
      this.fileReceiver().message(msg);
    }
  }

  private fileReceiver(): FileReceiver {
    return (this.files ??= new FileReceiver(cacheDirFor(this.host.dataDir, this.spec.uuid)));
  }

  /** The snapshot tree's files: say which are needed, then confirm all arrived intact. */
  private async onFiles(m: Extract<Control, { t: 'files' | 'files-done' }>): Promise<void> {
    try {
      if (!this.chain) throw new FerryError('TRANSPORT_PROTOCOL', 'migration: files without a snapshot chain at begin');
      const rx = this.fileReceiver();
      if (m.t === 'files') {
        const held = await rx.have(this.chain.files);
        const whole = new Set(held.whole);
        await this.peer.reply(m, { t: 'files-want', names: this.chain.files.filter((f) => !whole.has(f.name)).map((f) => f.name), ...(held.partial.length ? { partial: held.partial } : {}) });
      } else {
        await rx.complete(this.chain.files);
        await this.peer.reply(m, { t: 'files-ok' });
      }
    } catch (e) {
      await this.peer.replyError(m, e);
    }
  }

  private async prepare(m: Extract<Control, { t: 'prepare' }>): Promise<void> {
    try {
      this.journal('prepare');
      const r = await this.host.createIncoming(this.spec, this.from, cacheDirFor(this.host.dataDir, this.spec.uuid), this.chain);
      this.created = true;
      this.inst = r.inst;
      this.spec = r.spec;
      r.inst.once('exit', (info: { reason?: string }) => void this.fail(`destination QEMU exited: ${info?.reason ?? 'unknown'}`));
      const sock = this.host.nbdSocket(this.spec);
      await nbdServerStart(r.inst.qmp, sock);
      for (let i = 0; i < this.spec.disks.length; i++) {
        await exportAdd(r.inst.qmp, { id: `fm-disk${i}`, node: `disk${i}`, name: `disk${i}`, writable: true, allocationDepth: true });
        this.nbds.push(await NbdClient.connect({ path: sock }, `disk${i}`, ['base:allocation', 'qemu:allocation-depth']));
      }
      // Tell the source which 64 KiB blocks this host already holds (its templates, and the
      // newest backup of this VM in its chunk store): any disk block with that content crosses
      // as a 32-byte reference.
      const idxs = await this.host.chunkIndexes(this.spec).catch(() => []);
      this.indexes = idxs;
      if (idxs.length) {
        this.peer.session.useExternal((h) => {
          for (const i of idxs) {
            const b = i.read(h);
            if (b) return b;
          }
          return undefined;
        });
        this.peer.session.advertise(idxs.flatMap((i) => i.hashes()));
      }
      // A disk over a snapshot chain has no template shortcut: blocks the top layer lacks may
      // live in any image of the chain, not only in the template (base-hashes.ts).
      this.receiver = new DiskReceiver(this.nbds, this.peer, this.spec.disks.map((d) => (this.chain ? undefined : d.backing)));
      this.receiver.onError = (e) => void this.diskWriteFailed(e);
      this.journal('receiving');
      await this.peer.reply(m, { t: 'prepared', disks: this.spec.disks.map((d, i) => ({ id: d.id, sizeBytes: d.sizeBytes, base: r.bases[i]! })) });
    } catch (e) {
      await this.peer.replyError(m, e);
      await this.abort(`prepare failed: ${(e as Error).message}`);
    }
  }

  private async ramStart(m: Extract<Control, { t: 'ram-start' }>): Promise<void> {
    this.profile = startProfile(); // FERRY_PROFILE=DIR: the main thread's CPU, stopped once the VM runs here
    if (DEBUG) this.peer.session.trace = [];
    try {
      const qmp = this.inst!.qmp;
      await ramCapabilities(qmp, m.caps);
      if (Object.keys(m.params).length) await ramParameters(qmp, m.params);
      const sock = this.host.ramSocket(this.spec);
      await migrateIncoming(qmp, sock);
      this.ram = await connectToQemu(sock);
      warmUp();
      const file = this.host.ramFile(this.spec);
      if (fs.existsSync(file)) {
        this.ramTrack = new RamTracker(file, this.spec.memoryMiB * 2 ** 20);
        this.trackRamEvery(100);
      }
      // The source's page-delta codec, if offered in a version this agent decodes: its page cache
      // is at most the guest's RAM (what this host is about to hold anyway) and 1 GiB.
      const codec = m.codec?.v === RAM_CODEC_VERSION && m.codec.cacheBytes > 0 && m.codec.cacheBytes <= Math.min(this.spec.memoryMiB, 1024) * 2 ** 20 ? m.codec : undefined;
      if (codec) this.ramDecoder = new RamDecoder(codec.cacheBytes);
      for (const b of this.ramBacklog.splice(0)) this.writeRam(b);
      await this.peer.reply(m, { t: 'ram-ready', ...(codec ? { codec: codec.v } : {}) });
    } catch (e) {
      await this.peer.replyError(m, e);
    }
  }

  /** (Re)starts the early RAM hashing (ram-track.ts) every `ms`. */
  private trackRamEvery(ms: number): void {
    clearInterval(this.ramTrackTimer);
    const track = this.ramTrack;
    if (!track) return;
    this.ramTrackTimer = setInterval(() => void track.refresh(this.ram?.pending() ?? 1), ms);
    this.ramTrackTimer.unref();
  }

  private writeRam(m: Buffer): void {
    if (DEBUG && this.finalAt) this.ramAfterFinal.push([Date.now() - this.finalAt, m.length]);
    if (this.ramBroken) return;
    const dec = this.ramDecoder;
    if (!dec) return this.toQemu(m);
    try {
      let t0 = performance.now();
      dec.pushTo(m, (b) => {
        const t1 = performance.now();
        this.toQemu(b, () => dec.recycle(b));
        t0 += performance.now() - t1; // FERRY_DEBUG_MIGRATE's decodeMs: decoding only
      });
      if (DEBUG && this.finalAt) this.decodeMsAfterFinal += performance.now() - t0;
    } catch (e) {
      this.ramBroken = true; // what follows cannot be decoded either
      void this.fail(`bad RAM stream message: ${(e as Error).message}`);
    }
  }

  /** QEMU's stream bytes, in order, into its incoming socket (`written`: it took them). */
  private toQemu(b: Buffer, written?: () => void): void {
    if (!b.length) return;
    if (CORRUPT_STREAM && ++this.ramMessages === 100) b[b.length >> 1] ^= 1;
    this.ramTrack?.feed(b);
    this.ram!.write(b, written);
  }

  /**
   * QEMU loaded exactly the bytes the source's QEMU wrote, and its guest RAM equals the source's
   * (repaired where it did not), or the VM must not run here.
   */
  private async checkRam(): Promise<void> {
    // QEMU has loaded everything: this side's hashes (the groups touched since their early hash)
    // are taken now, while the source's may still be on their way.
    clearInterval(this.ramTrackTimer);
    const local = this.ramTrack?.final();
    local?.catch(() => {}); // awaited below, unless the stream check fails first
    while (!this.ramEnd) {
      if (this.phase === 'aborted' || this.giveUp) throw new FerryError('TRANSPORT_CLOSED', 'the source is gone before it sent the RAM stream digest');
      await sleep(2);
    }
    const e = this.ramEnd;
    if (e.streamHash !== STREAM_HASH) throw new FerryError('TRANSPORT_PROTOCOL', `the source hashes the RAM stream with ${e.streamHash}, this agent with ${STREAM_HASH}`);
    const got = { bytes: this.ram?.bytes() ?? 0, digest: this.ram?.digest() ?? '' };
    if (got.bytes !== e.bytes || got.digest !== e.stream) {
      throw new FerryError('VERIFY_FAILED', `the RAM stream differs: the source's QEMU wrote ${e.bytes} bytes (${STREAM_HASH} ${e.stream.slice(0, 16)}…), this QEMU was fed ${got.bytes} (${got.digest.slice(0, 16)}…)`);
    }
    this.ramDecoder = undefined; // the whole stream is in: its page cache (up to guest RAM) goes
    if (!e.groups) return; // the source's guest RAM is not file-backed: nothing to compare
    if (e.groupHash !== RAM_HASH) throw new FerryError('TRANSPORT_PROTOCOL', `the source hashes guest RAM with ${e.groupHash ?? 'SHA-256'}, this agent with ${RAM_HASH}`);
    const file = this.host.ramFile(this.spec);
    const want = Buffer.from(e.groups, 'base64');
    const bytes = this.spec.memoryMiB * 2 ** 20;
    let have: Buffer;
    if (local) {
      const r = await local;
      have = r.hashes;
      this.ramTrackStats = r.stats;
      // An early hash may be stale (ram-track.ts): what seems to differ is hashed again first.
      await rehashInto(file, have, differingGroups(want, have));
    } else have = await hashRam(file, bytes);
    const diff = differingGroups(want, have);
    this.ramRepairedGroups = diff.length;
    if (!diff.length) return;
    // QEMU's pre-copy left these groups different although its stream arrived intact: take the
    // source's (both guests are paused), write them into this guest's RAM, and check again.
    // One group per request (a control message must fit one 2 MiB frame), 8 in flight.
    const queue = [...diff];
    await Promise.all(
      Array.from({ length: Math.min(8, queue.length) }, async () => {
        for (let g = queue.shift(); g !== undefined; g = queue.shift()) {
          const r = await this.peer.request<Extract<Control, { t: 'ram-fixed' }>>({ t: 'ram-fix', groups: [g] }, 120_000);
          writeGroup(file, g, Buffer.from(r.data[0] ?? '', 'base64'));
        }
      }),
    );
    await rehashInto(file, have, diff);
    const again = differingGroups(want, have);
    console.error(`ferry: migration ${this.id}: guest RAM differed from the source's in ${diff.length} MiB after QEMU loaded the stream; ${again.length ? `${again.length} still differ` : 'repaired from the source'}`);
    if (again.length) throw new FerryError('VERIFY_FAILED', `guest RAM differs from the source's in ${again.length} MiB even after repair (first at ${again[0]! * RAM_GROUP})`);
  }

  /** FINAL barrier n: the guest is paused at the source. Verify, wait for RAM, run. */
  private async finish(n: number): Promise<void> {
    const t: Record<string, number> = { finalAt: Date.now() };
    this.profile.mark('final');
    this.finalAt = t.finalAt;
    // The guest is paused and the link, not the cores, is what the last pages wait for: hash the
    // groups they touch as QEMU loads them, every 10 ms, so that little is left once it is done.
    this.trackRamEvery(10);
    try {
      this.journal('finishing');
      const rx = this.receiver!;
      const bad = await new Promise<number>((resolve, reject) => {
        if (rx.lastBarrier >= n) return resolve(rx.unresolvedCount());
        rx.onBarrier = (k, mismatches) => k >= n && resolve(mismatches);
        const t = setInterval(() => {
          const e = rx.error();
          if (e) {
            clearInterval(t);
            reject(e);
          }
        }, 50);
      });
      if (bad) throw new FerryError('VERIFY_FAILED', `${bad} block(s) of the final disk delta did not verify`);
      t.diskVerifiedAt = Date.now();
      const qmp = this.inst!.qmp;
      // Integrity bookkeeping for the benchmark: what the guest writes once it runs here. Every
      // write of the migration itself is in and verified, and the guest is paused: add it now,
      // off the pause's critical path (RAM is still arriving).
      for (let i = 0; i < this.spec.disks.length; i++) await bitmapAdd(qmp, `disk${i}`, 'ferry-after-switchover').catch(() => {});
      // QEMU's MIGRATION event (the `events` capability is on) wakes the poll the moment it is done.
      let wake = () => {};
      const onEvent = (e: { event: string }) => e.event === 'MIGRATION' && wake();
      qmp.on('event', onEvent);
      try {
        for (;;) {
          const st = await queryMigrate(qmp);
          if (st.status === 'completed') break;
          if (st.status === 'failed') throw new FerryError('QEMU_FAILED', `incoming RAM migration failed: ${st.error ?? ''}`);
          if (this.phase === 'aborted') return;
          if (this.giveUp) throw new FerryError('TRANSPORT_CLOSED', 'the source is gone before the RAM stream completed');
          await Promise.race([sleep(10), new Promise<void>((r) => (wake = r))]);
        }
      } finally {
        qmp.off('event', onEvent);
      }
      t.ramCompletedAt = Date.now();
      t.ramLastBytesAt = this.ram?.lastWriteAt() ?? 0;
      await this.checkRam();
      t.ramCheckedAt = Date.now();
      t.ramEndAt = this.ramEndAt;
      t.ramRepairedMiB = this.ramRepairedGroups;
      if (this.ramTrackStats) t.ramHashedInPauseMiB = this.ramTrackStats.finalGroups;
      t.framesRebuilt = this.peer.session.stats.framesRebuilt;
      this.journal('running');
      await cont(qmp);
      const at = Date.now();
      t.contAt = at;
      this.profile.mark('cont');
      this.profile.stop('destination');
      this.host.activate(this.spec.name, this.from);
      await this.peer.send({ t: 'running', at, timings: t }, { urgent: true });
      releaseRam(this.host.ramFile(this.spec)); // checked: nothing hashes guest RAM here any more
      if (DEBUG) fs.appendFileSync(DEBUG, `${JSON.stringify({ side: 'destination', trace: this.peer.session.trace?.filter((e) => (e[1] as number) > t.finalAt! - 500), timings: t, decodeMs: Math.round(this.decodeMsAfterFinal), ramAfterFinal: this.ramAfterFinal, track: this.ramTrackStats })}\n`);
      // Our NBD clients and server go after the guest runs: nothing writes through them now.
      for (const c of this.nbds) await c.close();
      await nbdServerStop(qmp);
      await announceSelf(qmp);
    } catch (e) {
      await this.fail((e as Error).message);
    }
  }

  /** Tells the source this side will not run the VM, then aborts. */
  /**
   * A disk write fails when this side's QEMU died (its NBD server goes with it): then QEMU's own
   * reason, which its exit handler reports, is the one to give (CI: a corrupted RAM record made
   * QEMU's loader exit, and "NBD connection closed" was reported instead).
   */
  private async diskWriteFailed(e: Error): Promise<void> {
    if (await this.inst?.waitExit(1000)) return;
    await this.fail(`disk write failed: ${e.message}`);
  }

  private async fail(reason: string): Promise<void> {
    if (this.phase === 'running' || this.phase === 'done' || this.phase === 'aborted') return;
    await this.peer.send({ t: 'failed', reason }).catch(() => {});
    await this.abort(reason);
  }

  async abort(reason: string): Promise<void> {
    if (this.phase === 'running' || this.phase === 'done' || this.phase === 'aborted') return;
    this.files?.close(); // whole snapshot files stay in the cache for a retry
    // Refused at Begin: nothing was created here (a VM of that name may be someone else's).
    if (this.phase === 'begin') {
      host_forget(this.host, this.id);
      return;
    }
    this.journal('aborted', { error: reason });
    for (const i of this.indexes.splice(0)) i.close?.();
    this.ram?.close();
    this.ramDecoder = undefined;
    clearInterval(this.ramTrackTimer);
    await this.receiver?.persist(3000); // the partial disks are a retry's cache
    for (const c of this.nbds) await c.close().catch(() => {});
    await this.ramTrack?.stop().catch(() => {});
    releaseRam(this.host.ramFile(this.spec));
    // Only what this migration created: its VM record exists from the start of Prepare.
    if (this.created) await this.host.discard(this.spec.name, cacheDirFor(this.host.dataDir, this.spec.uuid)).catch(() => {});
    host_forget(this.host, this.id);
  }

  /** The session is gone for good (its resume limit passed, or the source closed it). */
  async onClosed(why: string): Promise<void> {
    this.giveUp = true;
    if (this.phase === 'finishing') {
      await this.finishing;
      if (this.ran()) return;
    }
    if (this.phase === 'running') {
      // Ran, but the source never confirmed: it will ask (query) and then finish its side.
      return;
    }
    await this.abort(`session closed: ${why}`);
  }

  private ran(): boolean {
    return this.phase === 'running' || this.phase === 'done';
  }

  /** A query from a new session: settle this migration so the answer is final. */
  async settleForQuery(): Promise<void> {
    this.giveUp = true;
    if (this.phase === 'finishing') await this.finishing;
    if (this.phase !== 'running' && this.phase !== 'done') await this.abort('the source asked from a new session (its old one is gone)');
  }
}

function host_forget(host: DestHost, id: string): void {
  host.live.delete(id);
}
