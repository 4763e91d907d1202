// Why this file exists: the destination half of the disk pre-copy. It applies DISK records to the
// destination QEMU's writable NBD exports (Ferry's NBD client, pipelined), and at each barrier
// flushes, reads every block written since the previous barrier back, and checks it against the
// SHA-256 the source sent (zeroes for ZERO records): end-to-end verification of the write path.
// It also answers `verify` requests with group hashes of its disks. Between barriers it flushes
// once a second, so a migration that ends early leaves disks holding what they were sent.
import { FerryError } from '../errors.js';
import type { NbdClient } from '../nbd/client.js';
import { templateBase } from './base-hashes.js';
import { groupCount, groupHashes, isZero, select, sha256 } from './blocks.js';
import type { Peer } from './peer.js';
import { decodeRecord, RECORD_FINAL, RecordKind, type Control, type DiskRecord, type VerifyRequest } from './protocol.js';

interface Written {
  disk: number;
  offset: number;
  length: number;
  hash: Buffer | null;
}

const MAX_PENDING_WRITES = 64;
/**
 * Written blocks are flushed (QEMU writes its qcow2 metadata back and syncs) at least this often:
 * until then a new cluster's mapping lives only in QEMU's memory, and a QEMU that ends without a
 * flush (killed, crashed, its quit timed out) leaves an image without the blocks: an aborted
 * migration's disks are the retry's cache, so they must hold what they were sent (CI: a retry
 * sent 35 of 37 MB again).
 */
const FLUSH_EVERY_MS = 1000;
/**
 * Fault injection for the verification tests: FERRY_FAULT=corrupt-final flips a byte of every
 * final-round block; corrupt-dirty-rounds of every block after round 0.
 */
const FAULT = process.env.FERRY_FAULT;

export class DiskReceiver {
  private header: DiskRecord | null = null;
  private chain: Promise<void> = Promise.resolve();
  private pending: Promise<void>[] = [];
  private since: Written[] = [];
  private failed: Error | null = null;
  receivedBytes = 0;
  lastBarrier = 0;
  private lastFlush = Date.now();
  /** disks written since the last flush */
  private unflushed = new Set<number>();
  /** blocks that failed a barrier's check and were not written again since */
  private unresolved: { disk: number; offset: number; length: number }[] = [];
  /** the result of the FINAL barrier (the guest is paused at the source) */
  onBarrier: ((n: number, mismatches: number) => void) | undefined;
  /** the first write or protocol error (the migration cannot complete after it) */
  onError: ((e: Error) => void) | undefined;

  /** `backings[i]`: this host's template disk i is an overlay on (its group hashes are cached) */
  constructor(private readonly nbds: NbdClient[], private readonly peer: Peer, private readonly backings: (string | undefined)[] = []) {}

  /** Feeds one DISK-channel message (called in channel order). */
  push(msg: Buffer): void {
    if (this.header) {
      const h = this.header;
      this.header = null;
      this.enqueue(() => this.applyData(h, msg));
      return;
    }
    const r = decodeRecord(msg);
    if (r.kind === RecordKind.DATA) this.header = r;
    else if (r.kind === RecordKind.ZERO) this.enqueue(() => this.applyZero(r));
    else this.enqueue(() => this.barrier(r.n));
  }

  private enqueue(fn: () => Promise<void>): void {
    this.chain = this.chain.then(fn).catch((e) => this.fault(e as Error));
  }

  /** The first failure ends this receiver's usefulness: report it once. */
  private fault(e: Error): void {
    if (this.failed) return;
    this.failed = e;
    this.onError?.(e);
  }

  private disk(i: number): NbdClient {
    const c = this.nbds[i];
    if (!c) throw new FerryError('TRANSPORT_PROTOCOL', `migration: record for disk ${i}, which does not exist`);
    return c;
  }

  private async throttle(p: Promise<void>): Promise<void> {
    this.pending.push(p.catch((e) => this.fault(e as Error)));
    if (this.pending.length >= MAX_PENDING_WRITES) await this.pending.shift();
  }

  private async applyData(h: DiskRecord, data: Buffer): Promise<void> {
    if (data.length !== h.length) throw new FerryError('TRANSPORT_PROTOCOL', `migration: block at ${h.offset} has ${data.length} bytes, header says ${h.length}`);
    if ((FAULT === 'corrupt-final' && h.flags && h.flags & RECORD_FINAL) || (FAULT === 'corrupt-dirty-rounds' && h.n >= 1)) {
      data = Buffer.from(data);
      data[0] = data[0]! ^ 0xff;
    }
    this.receivedBytes += data.length;
    this.resolve(h.disk, h.offset, h.length);
    // A block all zeroes is written as zeroes (keeps the destination image sparse).
    const c = this.disk(h.disk);
    await this.throttle(isZero(data) ? c.writeZeroes(h.offset, h.length) : c.write(h.offset, data));
    this.since.push({ disk: h.disk, offset: h.offset, length: h.length, hash: h.hash ?? null });
    await this.written(h.disk);
  }

  /** Every FLUSH_EVERY_MS, a flush of each disk written since the last one, in the pipeline. */
  private async written(disk: number): Promise<void> {
    this.unflushed.add(disk);
    if (Date.now() - this.lastFlush < FLUSH_EVERY_MS) return;
    this.lastFlush = Date.now();
    for (const i of this.unflushed) await this.throttle(this.disk(i).flush());
    this.unflushed.clear();
  }

  /**
   * An aborted migration: what was written becomes durable before QEMU goes (the disks stay as
   * the retry's cache). Waits for the writes in flight, not for records still queued; at most `ms`.
   */
  async persist(ms: number): Promise<void> {
    const work = (async () => {
      await Promise.all(this.pending.splice(0));
      for (const c of this.nbds) await c.flush();
    })();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([work.catch(() => {}), new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
    clearTimeout(timer);
  }

  /** A block written again resolves earlier mismatches it covers. */
  private resolve(disk: number, offset: number, length: number): void {
    if (this.unresolved.length) this.unresolved = this.unresolved.filter((m) => !(m.disk === disk && m.offset >= offset && m.offset + m.length <= offset + length));
  }

  private async applyZero(r: DiskRecord): Promise<void> {
    this.resolve(r.disk, r.offset, r.length);
    this.receivedBytes += r.length;
    await this.throttle(this.disk(r.disk).writeZeroes(r.offset, r.length));
    this.since.push({ disk: r.disk, offset: r.offset, length: r.length, hash: null });
    await this.written(r.disk);
  }

  /** Flush, read back, verify; answer `barrier-ok`. */
  private async barrier(n: number): Promise<void> {
    await Promise.all(this.pending.splice(0));
    if (this.failed) throw this.failed;
    for (const c of this.nbds) await c.flush();
    this.unflushed.clear();
    this.lastFlush = Date.now();
    const list = this.since;
    this.since = [];
    const mismatches: { disk: number; offset: number; length: number }[] = [];
    let verified = 0;
    for (let i = 0; i < list.length; i += 16) {
      const batch = list.slice(i, i + 16);
      const datas = await Promise.all(batch.map((w) => this.disk(w.disk).read(w.offset, w.length)));
      batch.forEach((w, k) => {
        const d = datas[k]!;
        const ok = w.hash ? sha256(d).equals(w.hash) : isZero(d);
        if (ok) verified += w.length;
        else mismatches.push({ disk: w.disk, offset: w.offset, length: w.length });
      });
    }
    this.lastBarrier = n;
    for (const m of mismatches) this.unresolved.push(m);
    await this.peer.send({ t: 'barrier-ok', n, verified, mismatches });
    this.onBarrier?.(n, mismatches.length + this.unresolved.length);
  }

  /** Answers a `verify` request with this end's group hashes. */
  async hashes(req: VerifyRequest): Promise<Omit<Extract<Control, { t: 'hashes' }>, 'rid'>> {
    await this.chain;
    const c = this.disk(req.disk);
    const groups = req.groups ?? Array.from({ length: groupCount(c.size, req.chunk, req.group) }, (_, i) => i);
    const zero = select(await c.map('base:allocation'), (f) => (f & 2) === 2);
    const base = await templateBase(c, this.backings[req.disk], req.chunk, req.group);
    const hs = await groupHashes(c, c.size, groups, zero, req.chunk, req.group, base);
    base?.cache.save();
    return { t: 'hashes', disk: req.disk, groups, hashes: Buffer.concat(hs).toString('base64') };
  }

  /** Resolves when everything pushed so far is applied; rejects with the first write error. */
  async drain(): Promise<void> {
    await this.chain;
    await Promise.all(this.pending.splice(0));
    if (this.failed) throw this.failed;
  }

  /** blocks still failing verification (must be 0 before the VM may run here) */
  unresolvedCount(): number {
    return this.unresolved.length;
  }

  error(): Error | null {
    return this.failed;
  }
}
