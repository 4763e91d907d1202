// Why this file exists: the source half of the block-level disk pre-copy. It reads the running
// VM's disks over a local NBD export of its own QEMU (Ferry's NBD client), finds what to send
// from QEMU dirty bitmaps (qemu:dirty-bitmap) and allocation maps (base:allocation,
// qemu:allocation-depth), and sends DISK records in rounds:
//
//   round 0  what the destination lacks: the top layer when it has the template, the allocated
//            data when it starts blank, or the hash-list difference when it holds a cached copy
//   round k  blocks the guest dirtied during round k-1 (bitmaps rotated atomically), plus any
//            the destination reported as mismatched
//
// Every round ends with a barrier the destination answers after reading back and verifying
// every block it wrote. `verify()` compares group hashes of whole disks (two-level hash list).
import { FerryError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { bitmapAdd, bitmapName, bitmapPrefix, bitmapRemove, bitmapRotate, exportAdd, exportDel, migrationBitmaps, nbdServerStart, nbdServerStop } from '../qemu/migration-ops.js';
import type { QmpClient } from '../qemu/qmp.js';
import { templateBase } from './base-hashes.js';
import { CHUNK, GROUP, groupCount, groupHashes, groupRanges, isZero, mergeRanges, select, sha256, splitAligned, totalBytes, type Range } from './blocks.js';
import type { Peer } from './peer.js';
import { CH, encodeRecord, RECORD_FINAL, RecordKind, type Control, type PreparedDisk } from './protocol.js';

export interface SourceDisk {
  index: number;
  node: string;
  size: number;
  base: PreparedDisk['base'];
  /** this host's template the disk is an overlay on (its group hashes are cached) */
  backing?: string;
}

export interface DiskStats {
  round: number;
  /** bytes of the current round sent / planned */
  roundDone: number;
  roundTotal: number;
  /** all rounds: raw bytes read and handed to the transport */
  sentBytes: number;
  /** round 0 alone: what the destination lacked at the start */
  initialBytes: number;
  zeroBytes: number;
  /** bytes the guest dirtied during the last round, and per second */
  lastDirtyBytes: number;
  dirtyRate: number;
  lastRoundMs: number;
  verifiedBytes: number;
  mismatches: number;
}

const READ_DEPTH = 16;
/** pipelined rounds (the RAM phase) go on while at most this many barriers await their answer */
const MAX_UNANSWERED = 3;
/** The QMP id of a disk's read-only export: the copy's, or the whole-disk comparison's (`verify`). */
const exportId = (d: SourceDisk, verify: boolean): string => `${verify ? 'fv' : 'fm'}-${d.node}`;

export class DiskSender {
  readonly stats: DiskStats = { round: 0, roundDone: 0, roundTotal: 0, sentBytes: 0, initialBytes: 0, zeroBytes: 0, lastDirtyBytes: 0, dirtyRate: 0, lastRoundMs: 0, verifiedBytes: 0, mismatches: 0 };
  private barrier = 0;
  /** extra ranges per disk to send next round (mismatches, differing groups) */
  private readonly extra = new Map<number, Range[]>();
  private bitmap = '';
  private roundStartedAt = 0;
  private badRounds = 0;
  /** barriers sent whose answer has not come (pipelined rounds), oldest first */
  private readonly unanswered = new Map<number, Promise<void>>();
  /** an answer's failure (VERIFY_FAILED), thrown by the next round */
  private answerError: Error | undefined;
  /** where the final round's time went (ms from its start), for the switchover report */
  readonly finalTimings: Record<string, number> = {};
  /** the step a dirty round is at (the switchover timeline says where the pause found it) */
  roundStep = 'idle';
  /**
   * Set when QEMU paused the guest: the round in flight still sends what it read (correctness),
   * but skips its clean-up (export and bitmap removal: QMP round trips the pause would wait for;
   * stopping the NBD server drops the exports, and the bitmaps go with the source's copy).
   */
  switching = false;
  /** whole-disk verification: ms hashing here, and ms waiting for the peer's hashes after that */
  readonly verifyTimings = { hashMs: 0, waitMs: 0 };

  constructor(
    private readonly qmp: QmpClient,
    private readonly peer: Peer,
    private readonly migId: string,
    private readonly disks: SourceDisk[],
    private readonly nbdSocket: string,
  ) {}

  private get nodes(): string[] {
    return this.disks.map((d) => d.node);
  }

  /** Starts dirty tracking and the local NBD server; must precede the first read. */
  async start(): Promise<void> {
    await nbdServerStart(this.qmp, this.nbdSocket);
    this.bitmap = bitmapName(this.migId, 1);
    for (const n of this.nodes) await bitmapAdd(this.qmp, n, this.bitmap);
    this.roundStartedAt = Date.now();
  }

  /** Removes every trace (bitmaps, exports, NBD server). Safe to call twice. */
  async cleanup(): Promise<void> {
    for (const d of this.disks) for (const id of [exportId(d, false), `ff-${d.node}`, exportId(d, true)]) await exportDel(this.qmp, id);
    await nbdServerStop(this.qmp);
    // Every bitmap of this migration: a round the switchover interrupted leaves its own behind.
    const mine = bitmapPrefix(this.migId);
    for (const b of await migrationBitmaps(this.qmp).catch(() => [])) if (b.name.startsWith(mine)) await bitmapRemove(this.qmp, b.node, b.name);
    if (this.bitmap) for (const n of this.nodes) await bitmapRemove(this.qmp, n, this.bitmap);
    this.bitmap = '';
  }

  /**
   * A read-only export of `d` and a connection to it. The whole-disk comparison has exports of
   * its own (`verify`): it may run alongside the RAM phase's dirty rounds.
   */
  private async open(d: SourceDisk, contexts: string[], verify = false): Promise<NbdClient> {
    const name = verify ? `${d.node}-verify` : d.node;
    await exportAdd(this.qmp, { id: exportId(d, verify), node: d.node, name, writable: false, allocationDepth: true });
    return NbdClient.connect({ path: this.nbdSocket }, name, contexts);
  }

  private async close(d: SourceDisk, c: NbdClient, verify = false): Promise<void> {
    await c.close();
    await exportDel(this.qmp, exportId(d, verify));
  }

  /** Round 0: what each destination disk lacks. Disks whose base is 'cached' are diffed by hash. */
  async initialRound(onProgress: () => void): Promise<void> {
    this.stats.round = 0;
    const plans: { d: SourceDisk; ranges: Range[] }[] = [];
    for (const d of this.disks) {
      if (d.base === 'cached') {
        plans.push({ d, ranges: (await this.diffTwoLevel(d, undefined)).ranges });
        continue;
      }
      const c = await this.open(d, ['base:allocation', 'qemu:allocation-depth']);
      try {
        const ranges =
          d.base === 'template'
            ? select(await c.map('qemu:allocation-depth'), (f) => f === 1) // top layer only
            : select(await c.map('base:allocation'), (f) => (f & 2) === 0); // not known to read as zero
        plans.push({ d, ranges });
      } finally {
        await this.close(d, c);
      }
    }
    this.stats.roundTotal = plans.reduce((a, p) => a + totalBytes(p.ranges), 0);
    this.stats.roundDone = 0;
    for (const p of plans) {
      const c = await this.open(p.d, []);
      try {
        await this.sendRanges(p.d, c, p.ranges, onProgress, p.d.base === 'zero');
      } finally {
        await this.close(p.d, c);
      }
    }
    this.stats.initialBytes = this.stats.sentBytes;
    await this.endRound();
  }

  /**
   * One dirty round: rotate the bitmaps (a new one tracks from now), send what the old one
   * recorded plus pending extras, then barrier. Returns the bytes sent. With `final`, the guest
   * is paused: the barrier is the FINAL one, and its answer is not awaited here.
   */
  async dirtyRound(onProgress: () => void, final = false, stopWaiting?: Promise<void>, pipelined = false): Promise<{ sent: number; barrier: number }> {
    if (this.answerError) throw this.answerError;
    const old = this.bitmap;
    this.stats.round++;
    const t0 = Date.now();
    const mark = (k: string) => {
      this.roundStep = k;
      if (final) this.finalTimings[k] = Date.now() - t0;
    };
    mark('start');
    if (final) {
      // The guest is paused: nothing new can be dirtied, so stop the bitmap instead of rotating.
      await this.qmp.execute('transaction', { actions: this.nodes.map((node) => ({ type: 'block-dirty-bitmap-disable', data: { node, name: old } })) });
    } else {
      const next = bitmapName(this.migId, this.stats.round + 1);
      await bitmapRotate(this.qmp, this.nodes, old, next);
      this.bitmap = next;
    }
    mark('bitmap');
    const elapsed = Date.now() - this.roundStartedAt;
    this.roundStartedAt = Date.now();
    const ctx = `qemu:dirty-bitmap:${old}`;
    // Exports and connections for every disk at once (each costs QMP and NBD round trips).
    const conns = await Promise.all(
      this.disks.map(async (d) => {
        // The final round's exports have names of their own: the round the pause interrupted
        // may have left its exports in place (`switching`).
        const name = final ? `${d.node}-final` : d.node;
        await exportAdd(this.qmp, { id: final ? `ff-${d.node}` : exportId(d, false), node: d.node, name, writable: false, bitmaps: [old] });
        return NbdClient.connect({ path: this.nbdSocket }, name, [ctx]);
      }),
    );
    mark('exports');
    let dirtyBytes = 0;
    let sent = 0;
    try {
      for (const d of this.disks) {
        const c = conns[d.index]!;
        const dirty = select(await c.map(ctx), (f) => (f & 1) === 1);
        mark(`map${d.index}`);
        dirtyBytes += totalBytes(dirty);
        const ranges = mergeRanges([...dirty, ...(this.extra.get(d.index) ?? [])]);
        this.extra.delete(d.index);
        this.stats.roundTotal = totalBytes(ranges);
        this.stats.roundDone = 0;
        sent += totalBytes(ranges);
        await this.sendRanges(d, c, ranges, onProgress, false, final ? RECORD_FINAL : 0);
        mark(`sent${d.index}`);
      }
    } finally {
      await Promise.all(conns.map((c) => c.close()));
      mark('closed');
      // At the switchover, stopping the NBD server (the caller's next step) drops the exports
      // and the bitmap goes with the rollback or the source copy; don't spend the pause on them.
      if (!final && !this.switching) {
        await Promise.all(this.disks.map((d) => exportDel(this.qmp, exportId(d, false))));
        for (const d of this.disks) await bitmapRemove(this.qmp, d.node, old);
      }
    }
    this.stats.lastDirtyBytes = dirtyBytes;
    this.stats.lastRoundMs = elapsed;
    // Dirty rate: what the guest dirtied over the time the previous round took (EWMA).
    const rate = elapsed > 0 ? (dirtyBytes * 1000) / elapsed : 0;
    this.stats.dirtyRate = this.stats.dirtyRate ? 0.5 * this.stats.dirtyRate + 0.5 * rate : rate;
    // The final round's barrier is answered after the switchover starts: the caller sends its
    // number in `final` and the destination refuses to run the VM unless it verifies.
    mark('barrier');
    const n = await this.sendBarrier();
    if (!final) {
      // The answer is waited for unless the switchover starts meanwhile (then the destination's
      // own list of unresolved blocks carries any mismatch to the final check). Pipelined, only
      // the answer MAX_UNANSWERED rounds back is: its mismatches join a later round.
      const answer = this.awaitBarrier(n).then(
        () => void this.unanswered.delete(n),
        (e: Error) => {
          this.unanswered.delete(n);
          this.answerError ??= e;
        },
      );
      this.unanswered.set(n, answer);
      const wait = pipelined ? (this.unanswered.size > MAX_UNANSWERED ? this.unanswered.values().next().value : undefined) : answer;
      if (wait) await (stopWaiting ? Promise.race([wait, stopWaiting]) : wait);
      if (this.answerError) throw this.answerError;
    }
    mark('idle');
    return { sent, barrier: n };
  }

  /** At the switchover: stop the NBD server (drops every export) — the one step the pause needs. */
  async release(): Promise<void> {
    await nbdServerStop(this.qmp);
  }

  /** Sends a barrier and returns its number (the answer arrives as `barrier-ok`). */
  async sendBarrier(): Promise<number> {
    const n = ++this.barrier;
    await this.peer.session.send(CH.DISK, encodeRecord({ kind: RecordKind.BARRIER, disk: 0, offset: 0, length: 0, n }));
    return n;
  }

  /** Waits for barrier `n`'s answer; mismatched blocks are queued for the next round. */
  async awaitBarrier(n: number): Promise<Extract<Control, { t: 'barrier-ok' }>> {
    const ok = await this.peer.next((m): m is Extract<Control, { t: 'barrier-ok' }> => m.t === 'barrier-ok' && m.n === n);
    this.stats.verifiedBytes += ok.verified;
    // Blocks that fail verification again and again point at a broken destination, not a race.
    this.badRounds = ok.mismatches.length ? this.badRounds + 1 : 0;
    if (this.badRounds >= 5) throw new FerryError('VERIFY_FAILED', `blocks written at the destination failed verification in ${this.badRounds} rounds in a row (last: ${ok.mismatches.length})`);
    for (const m of ok.mismatches) {
      this.stats.mismatches++;
      this.extra.set(m.disk, [...(this.extra.get(m.disk) ?? []), { offset: m.offset, length: m.length }]);
    }
    return ok;
  }

  private async endRound(): Promise<void> {
    await this.awaitBarrier(await this.sendBarrier());
  }

  /** Mismatches reported by the destination that are still to be re-sent. */
  pendingExtra(): number {
    let n = 0;
    for (const rs of this.extra.values()) n += totalBytes(rs);
    return n;
  }

  /**
   * Compares whole disks by group hashes (all groups, or a random `sampleFraction` of them);
   * differing groups are re-sent in the next round. Returns the number of groups compared.
   */
  async verify(sampleFraction?: number): Promise<{ groups: number; differing: number }> {
    let groups = 0;
    let differing = 0;
    for (const d of this.disks) {
      const n = groupCount(d.size);
      let pick: number[] | undefined;
      if (sampleFraction !== undefined && sampleFraction < 1) {
        pick = [];
        for (let g = 0; g < n; g++) if (Math.random() < sampleFraction) pick.push(g);
        if (!pick.length) pick.push(Math.floor(Math.random() * n));
      }
      const r = await this.diffTwoLevel(d, pick);
      groups += pick ? pick.length : n;
      differing += r.groups;
      if (r.ranges.length) this.extra.set(d.index, [...(this.extra.get(d.index) ?? []), ...r.ranges]);
    }
    return { groups, differing };
  }

  /**
   * Two-level compare: group hashes first, then chunk hashes inside the differing groups (the
   * guest keeps writing, so some groups always differ; re-sending 64 KiB chunks instead of
   * 1 MiB groups keeps that cheap). Returns the differing chunks as ranges.
   */
  private async diffTwoLevel(d: SourceDisk, pick: number[] | undefined): Promise<{ groups: number; ranges: Range[] }> {
    const diff = await this.diffGroups(d, pick);
    if (!diff.length) return { groups: 0, ranges: [] };
    const chunks = diff.flatMap((g) => Array.from({ length: GROUP }, (_, k) => g * GROUP + k)).filter((c) => c * CHUNK < d.size);
    const bad = await this.diffGroups(d, chunks, 1);
    return { groups: diff.length, ranges: groupRanges(bad, d.size, CHUNK, 1) };
  }

  /** Group indexes whose hashes differ between the two ends (both hash at the same time). */
  private async diffGroups(d: SourceDisk, pick: number[] | undefined, group = GROUP): Promise<number[]> {
    const all = pick ?? Array.from({ length: groupCount(d.size, CHUNK, group) }, (_, i) => i);
    const remote = this.peer.request<Extract<Control, { t: 'hashes' }>>({ t: 'verify', req: { disk: d.index, chunk: CHUNK, group, ...(pick ? { groups: pick } : {}) } });
    remote.catch(() => {}); // awaited below; a local failure first must not leave it unhandled
    const t0 = Date.now();
    const c = await this.open(d, ['base:allocation', 'qemu:allocation-depth'], true);
    let mine: Buffer[];
    let base: Awaited<ReturnType<typeof templateBase>>;
    try {
      const zero = select(await c.map('base:allocation'), (f) => (f & 2) === 2);
      base = await templateBase(c, d.backing, CHUNK, group);
      mine = await groupHashes(c, d.size, all, zero, CHUNK, group, base);
    } finally {
      await this.close(d, c, true);
    }
    base?.cache.save();
    const t1 = Date.now();
    const theirs = await remote;
    this.verifyTimings.hashMs += t1 - t0;
    this.verifyTimings.waitMs += Date.now() - t1;
    const hb = Buffer.from(theirs.hashes, 'base64');
    if (theirs.groups.length !== all.length || hb.length !== 32 * all.length) throw new FerryError('TRANSPORT_PROTOCOL', 'migration: hash list of the wrong length');
    const out: number[] = [];
    all.forEach((g, i) => {
      if (!hb.subarray(i * 32, i * 32 + 32).equals(mine[i]!)) out.push(g);
    });
    return out;
  }

  /** Reads `ranges` (pipelined) and sends them as DATA/ZERO records, in order. */
  private async sendRanges(d: SourceDisk, c: NbdClient, ranges: Range[], onProgress: () => void, skipZero: boolean, flags = 0): Promise<void> {
    const pieces = splitAligned(ranges, CHUNK);
    const reads: Promise<Buffer>[] = [];
    let next = 0;
    const refill = () => {
      while (reads.length < READ_DEPTH && next < pieces.length) {
        const p = pieces[next++]!;
        reads.push(c.read(p.offset, p.length));
      }
    };
    refill();
    try {
      await this.sendPieces(d, pieces, reads, refill, onProgress, skipZero, flags);
    } finally {
      // On an early exit the prefetched reads still settle (the export goes away): not an error.
      for (const r of reads) r.catch(() => {});
    }
  }

  private async sendPieces(d: SourceDisk, pieces: Range[], reads: Promise<Buffer>[], refill: () => void, onProgress: () => void, skipZero: boolean, flags: number): Promise<void> {
    for (const p of pieces) {
      const data = await reads.shift()!;
      refill();
      const s = this.peer.session;
      if (isZero(data)) {
        this.stats.zeroBytes += p.length;
        if (!skipZero) await s.send(CH.DISK, encodeRecord({ kind: RecordKind.ZERO, disk: d.index, offset: p.offset, length: p.length, n: this.stats.round, flags }));
      } else {
        await s.send(CH.DISK, encodeRecord({ kind: RecordKind.DATA, disk: d.index, offset: p.offset, length: p.length, n: this.stats.round, hash: sha256(data), flags }));
        await s.send(CH.DISK, data);
      }
      this.stats.sentBytes += p.length;
      this.stats.roundDone += p.length;
      onProgress();
    }
  }
}
