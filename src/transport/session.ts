// Why this file exists: one transport session (protocol.ts has the spec and the state diagram).
// It owns the sequence numbers, the window of unacknowledged frames, the in-order reassembly on
// receive, and the set of connections it stripes frames over. Connections come and go (endpoint.ts
// dials and accepts them); the session survives as long as one returns within resumeLimitMs.
//
// Exactly-once, in order: every DATA frame has a seq; the receiver delivers seq = delivered+1 and
// drops anything ≤ delivered or already buffered. A frame stays in `unacked` until the peer's
// cumulative ack passes it; when its connection dies it is queued again (a resend).
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import { FerryError } from '../errors.js';
import { Decoder, encode, FrameType, MAX_PAYLOAD, PRIORITY, type Frame } from './protocol.js';
import { decodeParity, encodeParity, Rebuilder, Striper } from './parity.js';
import { ContentCache, expand, reduce, type ReduceOptions } from './reduce.js';
import { TokenBucket } from './limiter.js';
import { tcpRecovering } from './tcp-info.js';

export interface SessionOptions {
  windowBytes: number;
  resumeLimitMs: number;
  /** a connection that received nothing for this long is presumed dead (blackholed) */
  idleTimeoutMs: number;
  pingMs: number;
  reduce: ReduceOptions;
  cacheBytes: number;
  limiter?: TokenBucket;
  /** cap of this session alone, bytes/s (0 = none); `limiter` is shared with other sessions */
  rateBytesPerSec?: number;
  /** content held outside the session (templates, backups) for REFs the peer was told about */
  external?: (hash: Buffer) => Buffer | undefined;
}

export const DEFAULT_SESSION: SessionOptions = {
  windowBytes: 32 << 20,
  resumeLimitMs: 10 * 60_000,
  idleTimeoutMs: 8000,
  pingMs: 1000,
  reduce: { compress: true, level: 3, dedup: true },
  cacheBytes: 256 << 20,
};

export interface SessionStats {
  messagesSent: number;
  payloadBytesSent: number;
  framesSent: number;
  framesResent: number;
  wireBytesSent: number;
  messagesReceived: number;
  duplicatesDropped: number;
  zeroFrames: number;
  refFrames: number;
  stalls: number;
  connectionsLost: number;
  /** smoothed RTT of pings (includes queueing behind data) */
  rttMs: number;
  /** smallest ping RTT seen: the path's own delay, without our queues */
  minRttMs: number;
  /** frames copied to another connection because frames sent after them were acked first */
  framesRescued: number;
  /** payload bytes of those copies */
  rescuedBytes: number;
  /** of those: copies made by the tail probe, and second copies of `copies: 2` messages */
  framesProbed: number;
  framesDoubled: number;
  /** PARITY frames sent (`protect`), their bytes, and DATA frames this side rebuilt from them */
  parityFrames: number;
  parityBytes: number;
  framesRebuilt: number;
  /** per channel: raw message bytes handed to send(), and their reduced (wire payload) bytes */
  channels: Record<number, { raw: number; reduced: number }>;
}

interface Outgoing {
  frame: Frame;
  size: number;
  conn: Conn | null;
  sentOnce: boolean;
  /** performance.now() when last written to a connection */
  sentAt: number;
  /** a copy went out on another connection because later frames were acknowledged first */
  rescued: boolean;
  /** sent on two connections at once (`send`'s `copies: 2`) */
  twice?: boolean;
  /** performance.now() when the parity of its stripe was written (parity on) */
  parityAt?: number;
}

let connIds = 0;
class Conn {
  readonly id = ++connIds;
  readonly decoder = new Decoder();
  readonly inflight = new Set<bigint>();
  /** bytes sent on this connection and not yet acknowledged: what striping balances */
  inflightBytes = 0;
  lastRx = Date.now();
  /** performance.now() when a frame sent (only) on this connection was last acknowledged */
  ackedAt = 0;
  timer: NodeJS.Timeout | undefined;
  constructor(readonly sock: Duplex) {}
}

const HIGH_WATER = 512 * 1024;
const NEVER = (): boolean => false;
/**
 * A connection that has received nothing (no ack, no pong) for this long gets no new frames:
 * when a link blackholes, connections die one by one, and frames moved onto the next silent
 * one would only have to move again.
 */
const SUSPECT_MS = 3500;
/** a message is handed to its handler only after an ACK went out at most this long before */
const ACK_PROMPT_MS = 5;
/** a parity stripe closes this long after its first member at the latest */
const STRIPE_HOLD_MS = 20;

export class Session extends EventEmitter {
  state: 'open' | 'stalled' | 'closed' = 'stalled';
  readonly stats: SessionStats = { messagesSent: 0, payloadBytesSent: 0, framesSent: 0, framesResent: 0, wireBytesSent: 0, messagesReceived: 0, duplicatesDropped: 0, zeroFrames: 0, refFrames: 0, stalls: 0, connectionsLost: 0, rttMs: 0, minRttMs: 0, framesRescued: 0, rescuedBytes: 0, framesProbed: 0, framesDoubled: 0, parityFrames: 0, parityBytes: 0, framesRebuilt: 0, channels: {} };
  private readonly conns = new Set<Conn>();
  private nextSeq = 1n;
  private readonly unacked = new Map<bigint, Outgoing>();
  private unackedBytes = 0;
  private readonly queues: bigint[][] = [[], [], [], []];
  private windowWaiters: (() => void)[] = [];
  /** highest seq such that every DATA frame up to it was received (what we ack) */
  received = 0n;
  private readonly rxAbove = new Set<bigint>();
  private readonly chanNextTx = new Map<number, bigint>();
  private readonly chanNextRx = new Map<number, bigint>();
  private readonly chanPending = new Map<number, Map<bigint, Frame>>();
  private ackTimer: NodeJS.Timeout | undefined;
  /** when the last ACK frame went out (performance.now()) */
  private ackSentAt = 0;
  private resumeTimer: NodeJS.Timeout | undefined;
  private pumpTimer: NodeJS.Timeout | undefined;
  private readonly tailTimer: NodeJS.Timeout;
  private readonly peerCache: ContentCache;
  private readonly myCache: ContentCache;
  /** acked bytes/s (EWMA over ~1 s samples), for the window */
  private ackRate = 0;
  private ackedSince = 0;
  private ackSampleAt = performance.now();
  private lastAckAt = performance.now();
  /** send time of the latest-sent frame known to have arrived (for `rescue`) */
  private ackedSentAt = 0;
  /** round trip of that frame (RACK's RTT: it includes the queueing delay of the moment) */
  private rackRtt = 0;

  private readonly ownLimit: TokenBucket | undefined;
  /** the peer rebuilds frames from PARITY (it said so in HELLO/WELCOME; endpoint.ts sets this) */
  peerParity = false;
  private striper: Striper<Conn> | undefined;
  /** the first frame sent while the striper was on (the ones before are in no stripe) */
  private protectedFrom = 0n;
  /** `closeStripe` was called: close the stripe once everything queued is written */
  private closeStripeWhenSent = false;
  private stripeTimer: NodeJS.Timeout | undefined;
  private readonly rebuilder = new Rebuilder();

  constructor(readonly id: string, readonly opts: SessionOptions) {
    super();
    this.ownLimit = opts.rateBytesPerSec ? new TokenBucket(opts.rateBytesPerSec) : undefined;
    this.peerCache = new ContentCache(opts.cacheBytes, false);
    this.myCache = new ContentCache(opts.cacheBytes, true);
    this.armResumeLimit();
    this.tailTimer = setInterval(() => this.probeTail(), 10);
    this.tailTimer.unref();
  }

  /** Tells the sender side that the peer holds this content (a have/want exchange's result). */
  peerHolds(hash: Buffer): void {
    this.peerCache.advertise(hash);
  }

  /**
   * Tells the peer which content this side holds outside the session (the `external` resolver
   * must return it when a REF arrives). Sent as HAVE frames of up to 32768 hashes.
   */
  advertise(hashes: Buffer[]): void {
    for (let i = 0; i < hashes.length; i += 32768) {
      const payload = Buffer.concat(hashes.slice(i, i + 32768));
      const c = this.pick() ?? [...this.conns][0];
      if (c) this.write(c, { type: FrameType.HAVE, channel: 0, flags: 0, seq: 0n, ack: this.received, payload });
    }
  }

  /**
   * Dialing side only (set by endpoint.dial): point future re-dials at the peer's new address;
   * the session resumes there as soon as its connections to the old one die.
   */
  retarget: ((host: string, port: number) => void) | undefined;

  /**
   * Forward error correction on or off (parity.ts): while on, every `k` DATA frames written to
   * distinct connections are followed by their XOR on yet another one, so a connection stalled
   * by a lost segment costs the receiver no round trip. About 1/k more bytes: for the few
   * moments where a round trip costs more than bytes (a migration's switchover). No-op unless
   * the peer said it rebuilds frames, or with fewer than 3 connections. A stripe closes at `k`
   * members or `holdMs` after its first, whichever comes first (or on `closeStripe`). Called
   * again while on, it changes `k` and `holdMs`: the open stripe's parity goes first.
   */
  protect(on: boolean, k = 15, holdMs = STRIPE_HOLD_MS): void {
    if (!on || this.striper) {
      this.flushStripe(true);
      if (!on) {
        this.striper = undefined;
        return;
      }
    }
    if (!this.peerParity || this.conns.size < 3) return;
    if (!this.striper) this.protectedFrom = this.nextSeq;
    this.striper = new Striper<Conn>(Math.max(2, k), holdMs);
  }

  /**
   * The open stripe's parity goes now: what was sent is the end of a burst (a migration's last
   * pages), and a member lost in it is rebuilt as soon as the parity arrives, right behind it.
   */
  closeStripe(): void {
    this.closeStripeWhenSent = true;
    this.pump(); // writes what is queued, then closes it
  }

  private stripe(f: Frame, c: Conn): void {
    const s = this.striper!;
    if (this.conns.size < 3) return; // no connection would be left for the parity
    s.k = Math.min(s.k, Math.max(2, this.conns.size - 1));
    const closed = s.add(f, c, performance.now());
    if (closed) this.sendParity(closed.frames, closed.conns);
    this.armStripeTimer();
  }

  /** Sends the open stripe's parity once it is due (`force`: now); looks again while one is open. */
  private flushStripe(force: boolean): void {
    const due = this.striper?.due(performance.now(), force);
    if (due) this.sendParity(due.frames, due.conns);
    if (!force) this.armStripeTimer();
  }

  private armStripeTimer(): void {
    if (!this.stripeTimer && this.striper?.open) this.stripeTimer = setTimeout(() => ((this.stripeTimer = undefined), this.flushStripe(false)), STRIPE_HOLD_MS);
  }

  private sendParity(frames: Frame[], members: Set<Conn>): void {
    const to = this.spare((c) => members.has(c));
    if (!to) return;
    const payload = encodeParity(frames);
    const at = performance.now();
    for (const f of frames) {
      const o = this.unacked.get(f.seq);
      if (o) o.parityAt = at;
    }
    this.stats.parityFrames++;
    this.stats.parityBytes += payload.length;
    this.write(to, { type: FrameType.PARITY, channel: 0, flags: 0, seq: 0n, ack: this.received, payload });
  }

  /** A method, not a field read, so callers re-check after an await. */
  isClosed(): boolean {
    return this.state === 'closed';
  }

  get connections(): number {
    return this.conns.size;
  }

  /**
   * Queues one message; resolves once it is inside the window (backpressure). `dedup: false`
   * skips the content cache for a stream whose messages never repeat (a byte stream cut at
   * arbitrary offsets): no hashing, and no cache memory on either end. `maxLevel` caps the zstd
   * level the link rate would choose (when CPU time matters more than a few % of wire bytes).
   * `copies: 2` sends the frame on two connections at once, for a small message whose delay
   * costs more than its bytes (the switchover's control messages on a lossy link).
   */
  async send(channel: number, msg: Buffer, o: { dedup?: boolean; maxLevel?: number; copies?: 1 | 2 } = {}): Promise<void> {
    if (this.state === 'closed') throw new FerryError('TRANSPORT_CLOSED', 'transport session is closed');
    // One message is one frame: refuse it here, before it takes a sequence number the peer would
    // wait for forever.
    if (msg.length > MAX_PAYLOAD) throw new FerryError('INVALID_ARGUMENT', `a transport message is at most ${MAX_PAYLOAD} bytes; this one is ${msg.length}`);
    while (this.unackedBytes > 0 && this.unackedBytes + msg.length > this.window()) {
      await new Promise<void>((r) => this.windowWaiters.push(r));
      if (this.isClosed()) throw new FerryError('TRANSPORT_CLOSED', 'transport session closed while sending');
    }
    const r = reduce(msg, { ...this.opts.reduce, level: Math.min(this.compressionLevel(), o.maxLevel ?? Infinity), ...(o.dedup === false ? { dedup: false } : {}) }, this.peerCache);
    const seq = this.nextSeq++;
    const cseq = this.chanNextTx.get(channel) ?? 1n;
    this.chanNextTx.set(channel, cseq + 1n);
    const frame: Frame = { type: FrameType.DATA, channel, flags: r.flags, seq, ack: 0n, cseq, payload: r.payload };
    this.unacked.set(seq, { frame, size: r.payload.length, conn: null, sentOnce: false, sentAt: 0, rescued: false, ...(o.copies === 2 ? { twice: true } : {}) });
    if (this.unackedBytes === 0) this.lastAckAt = performance.now(); // progress is timed from here
    this.unackedBytes += r.payload.length;
    this.stats.messagesSent++;
    this.stats.payloadBytesSent += msg.length;
    const ch = (this.stats.channels[channel] ??= { raw: 0, reduced: 0 });
    ch.raw += msg.length;
    ch.reduced += r.payload.length;
    if (r.flags & 4) this.stats.zeroFrames++;
    if (r.flags & 8) this.stats.refFrames++;
    this.queues[PRIORITY[channel] ?? 3]!.push(seq);
    this.pump();
  }

  /**
   * How many unacked bytes may be outstanding: 4 × the measured bandwidth-delay product, at
   * least 2 MiB, at most windowBytes. Keeping only that much in the sockets keeps what must be
   * resent after a connection dies small, without starving the link.
   */
  window(): number {
    // The minimum RTT, not the smoothed one: pings wait behind our own queued data, and a
    // window sized from that inflated figure would only feed the queue it measures.
    const rtt = Math.max(this.stats.minRttMs, 10) / 1000;
    const bdp = this.ackRate * rtt;
    return Math.min(this.opts.windowBytes, Math.max(1 << 20, 4 * bdp));
  }

  /**
   * zstd level from the measured link rate vs CPU: the highest level whose single-core speed on
   * this class of machine (measured: L1 ~700 MB/s, L3 ~555 MB/s; L6/L9 slower) stays ≥ 8 × the
   * rate the link drains. Slow links get stronger compression for free; fast ones stay cheap.
   */
  compressionLevel(): number {
    if (!this.ackRate) return this.opts.reduce.level;
    const speeds: [number, number][] = [[9, 60e6], [6, 150e6], [3, 500e6], [1, 700e6]];
    for (const [level, bps] of speeds) if (bps >= 8 * this.ackRate) return level;
    return 1;
  }

  /** Content this side holds outside the session: resolves REFs the peer sends after `advertise`. */
  useExternal(fn: (hash: Buffer) => Buffer | undefined): void {
    this.opts.external = fn;
  }

  /** Acknowledged wire bytes per second (EWMA over ~1 s samples): what the path drains now. */
  drainRate(): number {
    return this.ackRate;
  }

  /**
   * Whether the link is carrying what is sent: false when the session stalled, or when bytes are
   * outstanding and the peer acknowledged nothing for `ms` (a blackholed path keeps its
   * connections open until their idle timeout).
   */
  draining(ms = 1000): boolean {
    if (this.state !== 'open') return false;
    return this.unackedBytes === 0 || performance.now() - this.lastAckAt < ms;
  }

  /** Bytes handed to send() and not yet acknowledged (reduced size). */
  get unackedPayload(): number {
    return this.unackedBytes;
  }

  /** Resolves when everything sent so far is acknowledged by the peer. */
  async flush(): Promise<void> {
    while (this.unacked.size) {
      if (this.state === 'closed') throw new FerryError('TRANSPORT_CLOSED', 'transport session closed before flush');
      await new Promise<void>((r) => this.windowWaiters.push(r));
    }
  }

  /** Frames received above the cumulative point (a selective ack for the handshake). */
  receivedAbove(max = 4096): string[] {
    return [...this.rxAbove].slice(0, max).map(String);
  }

  /**
   * Adds a handshaken connection; `peerRecv` is the peer's cumulative receive point and
   * `peerAbove` the frames it holds beyond it (those are not sent again).
   */
  attach(sock: Duplex, peerRecv: bigint, peerAbove: bigint[] = []): void {
    if (this.state === 'closed') {
      sock.destroy();
      return;
    }
    const c = new Conn(sock);
    this.conns.add(c);
    this.onAck(peerRecv);
    for (const seq of peerAbove) this.ackOne(seq);
    sock.on('data', (d: Buffer) => this.onData(c, d));
    sock.on('close', () => this.detach(c));
    sock.on('error', () => sock.destroy());
    c.timer = setInterval(() => {
      if (Date.now() - c.lastRx > this.opts.idleTimeoutMs) sock.destroy();
      else this.write(c, { type: FrameType.PING, channel: 0, flags: 0, seq: 0n, ack: this.received, payload: stamp() });
    }, this.opts.pingMs);
    if (this.state === 'stalled') {
      this.state = 'open';
      if (this.resumeTimer) clearTimeout(this.resumeTimer);
      this.emit('resume', { connections: this.conns.size });
    }
    (sock as Duplex & { setNoDelay?: (b: boolean) => void }).setNoDelay?.(true);
    sock.on('drain', () => this.pump());
    this.pump();
  }

  close(reason = 'closed'): void {
    if (this.state === 'closed') return;
    for (const c of this.conns) this.write(c, { type: FrameType.CLOSE, channel: 0, flags: 0, seq: 0n, ack: this.received, payload: Buffer.from(JSON.stringify({ reason })) });
    this.shutdown(reason);
  }

  private shutdown(reason: string): void {
    this.state = 'closed';
    for (const c of this.conns) {
      clearInterval(c.timer);
      c.sock.end();
      setTimeout(() => c.sock.destroy(), 1000).unref();
    }
    this.conns.clear();
    for (const t of [this.ackTimer, this.resumeTimer, this.pumpTimer, this.stripeTimer]) if (t) clearTimeout(t);
    clearInterval(this.tailTimer);
    this.opts.limiter?.forget(this);
    this.wakeWindow();
    this.emit('close', reason);
  }

  private detach(c: Conn): void {
    if (!this.conns.delete(c)) return;
    clearInterval(c.timer);
    let requeued = 0;
    for (const seq of c.inflight) {
      const o = this.unacked.get(seq);
      if (o && o.conn === c) {
        requeued++;
        o.conn = null;
        this.queues[PRIORITY[o.frame.channel] ?? 3]!.unshift(seq);
      }
    }
    c.inflight.clear();
    c.inflightBytes = 0;
    if (this.state === 'closed') return;
    this.stats.connectionsLost++;
    this.emit('connection-lost', { connections: this.conns.size, inflight: requeued });
    if (this.conns.size === 0 && this.state === 'open') {
      this.state = 'stalled';
      this.stats.stalls++;
      this.emit('stall');
      this.armResumeLimit();
    }
    this.pump();
  }

  private armResumeLimit(): void {
    if (this.resumeTimer) clearTimeout(this.resumeTimer);
    this.resumeTimer = setTimeout(() => {
      if (this.state !== 'open') this.shutdown(`no connection for ${this.opts.resumeLimitMs} ms`);
    }, this.opts.resumeLimitMs);
    this.resumeTimer.unref();
  }

  /**
   * For debugging (FERRY_DEBUG_MIGRATE), when set: [kind, epoch ms, seq, connection, n] of DATA
   * frames written (w; n = bytes), PARITY written (p; seq = its first member's), DATA received (r),
   * PARITY received (q), frames rebuilt (b) and messages delivered (d; n = channel).
   */
  trace: (string | number)[][] | undefined;
  private tr(kind: string, seq: bigint, c: Conn | null, n: number): void {
    this.trace?.push([kind, Math.round((performance.timeOrigin + performance.now()) * 10) / 10, Number(seq), c?.id ?? 0, n]);
  }

  private write(c: Conn, f: Frame): boolean {
    const b = encode(f);
    if (this.trace && f.type === FrameType.DATA) this.tr('w', f.seq, c, b.length);
    if (this.trace && f.type === FrameType.PARITY) this.tr('p', f.payload.length > 10 ? f.payload.readBigUInt64BE(2) : 0n, c, b.length);
    this.stats.wireBytesSent += b.length;
    return c.sock.write(b);
  }

  private pick(): Conn | null {
    // With parity on, a connection already in the open stripe would close it early (a parity
    // frame per two or three frames): prefer the others while any can take a frame. And a
    // connection holding a frame that later ones overtook is recovering a lost segment (or is
    // window-limited): a frame written to it now waits behind that, and two such members of
    // one stripe are more than its parity can rebuild (wan-10 pauses: a stall of 30–136 ms
    // in the RAM channel in nearly every run, while 1–2 of the 16 connections recover).
    const avoid = this.striper?.usedConns();
    const stuck = this.stuckTest();
    if (avoid?.size) {
      const c = this.pickFrom((c) => !avoid.has(c) && !stuck(c)) ?? this.pickFrom((c) => !avoid.has(c));
      if (c) return c;
    }
    return (stuck !== NEVER ? this.pickFrom((c) => !stuck(c)) : null) ?? this.pickFrom(() => true);
  }

  /**
   * While parity protects what is sent (a switchover): whether a connection's TCP is recovering
   * a lost segment (the kernel says so), or its oldest frame in flight was written `margin`
   * before the latest one acknowledged (on any connection) and is still unacknowledged.
   * Otherwise no connection counts as stuck: in a bulk transfer queues are deep and frames
   * overtake each other without loss.
   */
  private stuckTest(): (c: Conn) => boolean {
    if (!this.striper) return NEVER;
    const before = this.ackedSentAt ? this.ackedSentAt - this.reorderMs() : 0;
    return (c) => {
      // The kernel knows first (tcp-info.ts): acknowledgements stop saying so once the frames
      // in flight on a stalled connection were rebuilt from parity at the other end.
      if (tcpRecovering(c.sock)) return true;
      const first = c.inflight.values().next();
      if (first.done) return false;
      const o = this.unacked.get(first.value);
      return !!o && o.sentAt > 0 && o.sentAt < before;
    };
  }

  /**
   * How much earlier than the latest acknowledged frame a frame must have been written for its
   * missing acknowledgement to say it was overtaken (lost, or held in its connection), not
   * merely reordered: a quarter of the minimum round trip, 20 ms at least.
   */
  private reorderMs(): number {
    return Math.max(20, Math.max(this.stats.minRttMs, 1) / 4);
  }

  private pickFrom(ok: (c: Conn) => boolean): Conn | null {
    let best: Conn | null = null;
    let suspect = false;
    const now = Date.now();
    for (const c of this.conns) {
      if (!ok(c)) continue;
      if (now - c.lastRx > SUSPECT_MS) {
        suspect = true;
        continue;
      }
      // Balance on unacknowledged bytes: the kernel takes writes at once, so Node's own buffer
      // (writableLength) says nothing about how loaded a connection really is.
      const w = c.sock.writableLength;
      if (w < HIGH_WATER && (!best || c.inflightBytes + w < best.inflightBytes + best.sock.writableLength)) best = c;
    }
    // Silent connections send no 'drain' that would wake us: look again shortly.
    if (!best && suspect && !this.pumpTimer) this.pumpTimer = setTimeout(() => ((this.pumpTimer = undefined), this.pump()), 250);
    return best;
  }

  private pump(): void {
    if (this.state !== 'open') return;
    for (;;) {
      const q = this.queues.find((x) => x.length);
      if (!q) {
        if (this.closeStripeWhenSent) {
          this.closeStripeWhenSent = false;
          this.flushStripe(true);
        }
        return;
      }
      const c = this.pick();
      if (!c) return; // 'drain' calls pump again
      const seq = q[0]!;
      const o = this.unacked.get(seq);
      if (!o || o.conn) {
        q.shift();
        continue;
      }
      const wait = Math.max(this.ownLimit?.take(o.size + 40) ?? 0, this.opts.limiter?.take(o.size + 40, this) ?? 0);
      if (wait > 0) {
        if (!this.pumpTimer) this.pumpTimer = setTimeout(() => ((this.pumpTimer = undefined), this.pump()), Math.ceil(wait));
        return;
      }
      q.shift();
      o.conn = c;
      c.inflight.add(seq);
      c.inflightBytes += o.size;
      if (o.sentOnce) this.stats.framesResent++;
      o.sentOnce = true;
      o.sentAt = performance.now();
      o.rescued = false;
      o.parityAt = undefined;
      this.stats.framesSent++;
      this.write(c, { ...o.frame, ack: this.received });
      if (o.twice) this.copy(o, 'urgent');
      else if (this.striper && o.frame.channel !== 0) this.stripe(o.frame, c);
    }
  }

  private onData(c: Conn, d: Buffer): void {
    c.lastRx = Date.now();
    let frames: Frame[];
    try {
      frames = c.decoder.push(d);
    } catch (e) {
      return this.refuse(c, (e as Error).message);
    }
    for (const f of frames) {
      this.onAck(f.ack);
      switch (f.type) {
        case FrameType.DATA:
          if (this.trace) this.tr('r', f.seq, c, f.payload.length);
          this.onDataFrame(f);
          break;
        case FrameType.PING:
          this.write(c, { type: FrameType.PONG, channel: 0, flags: 0, seq: 0n, ack: this.received, payload: f.payload });
          break;
        case FrameType.PONG: {
          const rtt = Number(process.hrtime.bigint() - f.payload.readBigUInt64BE(0)) / 1e6;
          this.stats.rttMs = this.stats.rttMs ? this.stats.rttMs * 0.8 + rtt * 0.2 : rtt;
          this.stats.minRttMs = this.stats.minRttMs ? Math.min(this.stats.minRttMs, rtt) : rtt;
          break;
        }
        case FrameType.CLOSE:
          this.shutdown(`peer closed: ${safeReason(f.payload)}`);
          return;
        case FrameType.ACK:
          if (f.payload.length % 8) return this.refuse(c, 'ACK payload is not a list of u64 seqs');
          for (let i = 0; i < f.payload.length; i += 8) this.ackOne(f.payload.readBigUInt64BE(i));
          if (f.payload.length) this.wakeWindow();
          this.rescue();
          break;
        case FrameType.HAVE:
          if (f.payload.length % 32) return this.refuse(c, 'HAVE payload is not a list of 32-byte hashes');
          for (let i = 0; i < f.payload.length; i += 32) this.peerHolds(f.payload.subarray(i, i + 32));
          this.emit('have', f.payload.length / 32);
          break;
        case FrameType.PARITY:
          if (this.trace) this.tr('q', 0n, c, f.payload.length);
          for (const r of this.rebuilder.offer(decodeParity(f.payload), (s) => this.has(s))) {
            if (this.trace) this.tr('b', r.seq, c, r.payload.length);
            this.stats.framesRebuilt++;
            this.onDataFrame(r);
          }
          break;
        case FrameType.HELLO:
        case FrameType.WELCOME:
          return this.refuse(c, 'handshake frame inside an open connection');
      }
    }
  }

  /** A peer that breaks the protocol loses this connection (the session re-dials or resumes). */
  private refuse(c: Conn, why: string): void {
    this.emit('protocol-error', why);
    c.sock.destroy();
  }

  private onDataFrame(f: Frame): void {
    if (f.seq <= this.received || this.rxAbove.has(f.seq) || !f.cseq) {
      this.stats.duplicatesDropped++;
    } else {
      this.rebuilder.keep(f);
      this.rxAbove.add(f.seq);
      while (this.rxAbove.delete(this.received + 1n)) this.received++;
      let pending = this.chanPending.get(f.channel);
      if (!pending) this.chanPending.set(f.channel, (pending = new Map()));
      pending.set(f.cseq, f);
      let next = this.chanNextRx.get(f.channel) ?? 1n;
      let m: Frame | undefined;
      while ((m = pending.get(next))) {
        pending.delete(next);
        next++;
        this.chanNextRx.set(f.channel, next);
        let msg: Buffer;
        try {
          msg = expand(m.flags, m.payload, this.myCache, this.opts.external);
        } catch (e) {
          this.close(`undecodable message ${m.seq}: ${(e as Error).message}`);
          return;
        }
        this.stats.messagesReceived++;
        if (this.trace) this.tr('d', m.seq, null, m.channel);
        // The handler may hold this thread for milliseconds (a migration's RAM decoder): what
        // arrived is acknowledged first, or the sender, seeing no acknowledgement, takes frames
        // in flight for lost and copies them (99 copies in one wan-10 pause, ~30 KB of link).
        if (performance.now() - this.ackSentAt >= ACK_PROMPT_MS) this.sendAck();
        this.emit('message', m.channel, msg);
      }
      // The frame may complete a stripe still missing two members: rebuild the other one.
      for (const r of this.rebuilder.offer(undefined, (s) => this.has(s), f.seq)) {
        if (this.trace) this.tr('b', r.seq, null, r.payload.length);
        this.stats.framesRebuilt++;
        this.onDataFrame(r);
      }
    }
    if (!this.ackTimer) this.ackTimer = setTimeout(() => this.sendAck(), 10);
  }

  private has(seq: bigint): boolean {
    return seq <= this.received || this.rxAbove.has(seq);
  }

  private sendAck(): void {
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    this.ackSentAt = performance.now();
    let best: Conn | null = null;
    for (const c of this.conns) if (!best || c.sock.writableLength < best.sock.writableLength) best = c;
    if (!best) return;
    const above = [...this.rxAbove].slice(0, 1024);
    const payload = Buffer.alloc(above.length * 8);
    above.forEach((seq, i) => payload.writeBigUInt64BE(seq, i * 8));
    this.write(best, { type: FrameType.ACK, channel: 0, flags: 0, seq: 0n, ack: this.received, payload });
  }

  private onAck(ack: bigint): void {
    if (!this.unacked.size) return;
    let freed = false;
    for (const [seq] of this.unacked) {
      if (seq > ack) break;
      freed = this.ackOne(seq) || freed;
    }
    if (freed) this.wakeWindow();
  }

  private ackOne(seq: bigint): boolean {
    const o = this.unacked.get(seq);
    if (!o) return false;
    this.unacked.delete(seq);
    this.unackedBytes -= o.size;
    if (o.conn) {
      o.conn.inflight.delete(seq);
      o.conn.inflightBytes -= o.size;
    }
    this.ackedSince += o.size;
    const now = performance.now();
    this.lastAckAt = now;
    if (o.conn && !o.rescued) o.conn.ackedAt = now;
    if (o.sentAt > this.ackedSentAt) {
      this.ackedSentAt = o.sentAt;
      if (!o.rescued) this.rackRtt = now - o.sentAt; // with two copies out, the sample is ambiguous
    }
    if (now - this.ackSampleAt >= 500) {
      const rate = (this.ackedSince * 1000) / (now - this.ackSampleAt);
      this.ackRate = this.ackRate ? this.ackRate * 0.7 + rate * 0.3 : rate;
      this.ackedSince = 0;
      this.ackSampleAt = now;
    }
    return true;
  }

  /**
   * Loss recovery across connections (RACK-like). A frame still unacknowledged although frames
   * written after it, on other connections, arrived a while ago was most likely lost in its TCP
   * connection, which will retransmit it only after its own recovery (on a thin, lossy flow often
   * a retransmission timeout of 200 ms or more). Until then every later frame of its channel
   * waits at the receiver. So a copy goes out once on the least loaded other connection; the
   * receiver drops whichever arrives second. Costs about the loss rate in extra bytes; shortens
   * the stall at the end of every burst (the switchover's last pages).
   * Only while the queue is shallow (at most a bandwidth-delay product, 128 KiB at least): a
   * frame's send time is when it entered its connection's kernel buffer, and with deep buffers a
   * frame behind more bytes is overtaken by later ones without being lost (measured on wan-10
   * during the bulk disk copy: half the wire went to needless copies). For the same reason, not
   * while its own connection is seen delivering what was written to it before.
   */
  private rescue(): void {
    // While parity protects what is sent, a stalled connection's frames are rebuilt from it; copies
    // would only queue on the link ahead of the last real bytes (70 KB in one wan-10 pause): a
    // protected frame is copied only once its parity evidently failed. The frames sent before
    // protection began are in no stripe: they are still copied (one waited 149 ms in a wan-10
    // pause).
    if (this.conns.size < 2 || !this.ackedSentAt) return;
    const unprotectedBelow = this.striper ? this.protectedFrom : undefined;
    const now = performance.now();
    const rtt = Math.max(this.stats.minRttMs, 1);
    // With parity on, QEMU's stream is paced to about one bandwidth-delay product: the queue is
    // shallow by design, and the pause's (what was in flight plus its last pages) may pass 128 KiB
    // (one wan-10 pause waited 200 ms for TCP's own recovery of a frame copied too late so).
    if (this.unackedBytes > (this.striper ? 2 : 1) * Math.max(128 * 1024, (this.ackRate * rtt) / 1000)) return;
    const margin = this.reorderMs();
    const before = this.ackedSentAt - margin;
    // Lost only once it is later than the latest delivered frame's round trip (which counts the
    // queue it waited in) allows: with a deep queue, minimum-RTT timing copied frames in transit.
    const late = Math.max(rtt, this.rackRtt) + margin;
    // A frame its stripe's parity should have rebuilt by now was not: two of the stripe were
    // lost, or the parity was (one wan-10 pause waited 133 ms for such a frame). Once the parity
    // went, that shows as for any frame: no acknowledgement a round trip after it. A frame whose
    // stripe is still open waits longer.
    const lateProtected = late + Math.max(30, rtt / 2);
    for (const o of this.unacked.values()) {
      const covered = unprotectedBelow !== undefined && o.frame.seq >= unprotectedBelow; // its stripe's parity covers it
      const due = !covered ? now - o.sentAt >= late : o.parityAt !== undefined ? now - Math.max(o.sentAt, o.parityAt) >= late : now - o.sentAt >= lateProtected;
      if (!o.conn || o.rescued || o.sentAt > before || !due) continue;
      // Its connection delivers (a frame written to it earlier was just acknowledged): the frame
      // waits in that connection's queue behind congestion-window-limited data, it is not lost.
      if (now - o.conn.ackedAt < margin) continue;
      if (!this.copy(o, 'rescue')) return;
    }
  }

  /**
   * The frames at the tail of a burst (the switchover's last pages) have no later frame whose
   * acknowledgement would reveal their loss to `rescue`; TCP itself finds a lost tail segment
   * only after a probe timeout of about two round trips, or its retransmission timeout. When
   * little is in flight, a frame not acknowledged within 1.5 minimum round trips (or 1.25 of the
   * latest measured one) + 20 ms + the time the
   * link needs for what is queued, although one written just before it was, is copied once to
   * another connection.
   */
  private probeTail(): void {
    if (this.conns.size < 2 || !this.unacked.size || !this.stats.minRttMs) return;
    const rate = Math.max(this.ackRate, 100_000);
    const rtt = this.stats.minRttMs;
    if (this.unackedBytes > Math.max(64 * 1024, (rate * rtt) / 2000)) return;
    const now = performance.now();
    const due = Math.max(rtt * 1.5, this.rackRtt * 1.25) + 20 + (this.unackedBytes / rate) * 1000;
    const near = this.reorderMs();
    for (const o of this.unacked.values()) {
      if (!o.conn || o.rescued || !o.sentAt || now - o.sentAt < due) continue;
      // Only next to frames that did arrive: in an outage nothing sent since it began is acked,
      // and copies onto connections as dead as the first would only count as re-sent.
      if (o.sentAt - this.ackedSentAt > near) continue;
      if (!this.copy(o, 'tail')) return;
    }
  }

  /** Sends a copy of a presumed-lost frame on the least loaded other live connection (once). */
  private copy(o: Outgoing, why: 'rescue' | 'tail' | 'urgent'): boolean {
    const to = this.spare((c) => c === o.conn);
    if (!to) return false;
    o.rescued = true;
    this.stats.framesRescued++;
    this.stats.rescuedBytes += o.size;
    if (why === 'tail') this.stats.framesProbed++;
    if (why === 'urgent') this.stats.framesDoubled++;
    this.write(to, { ...o.frame, ack: this.received });
    return true;
  }

  /**
   * The least loaded live connection that `skip` does not exclude (for copies and parity), one
   * not stuck (`stuckTest`) if there is one: a copy or parity behind a lost segment is no help.
   */
  private spare(skip: (c: Conn) => boolean): Conn | null {
    const wall = Date.now(); // lastRx is wall-clock time (an old check compared it with performance.now())
    const stuck = this.stuckTest();
    let to: Conn | null = null;
    let toStuck = true;
    for (const c of this.conns) {
      if (skip(c) || wall - c.lastRx > SUSPECT_MS || c.sock.writableLength >= HIGH_WATER) continue;
      const st = stuck(c);
      if (!to || (toStuck && !st) || (st === toStuck && c.inflightBytes + c.sock.writableLength < to.inflightBytes + to.sock.writableLength)) {
        to = c;
        toStuck = st;
      }
    }
    return to;
  }

  private wakeWindow(): void {
    const w = this.windowWaiters;
    this.windowWaiters = [];
    for (const r of w) r();
  }
}

function stamp(): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(process.hrtime.bigint());
  return b;
}

function safeReason(p: Buffer): string {
  try {
    return String((JSON.parse(p.toString()) as { reason?: string }).reason ?? 'closed');
  } catch {
    return 'closed';
  }
}
