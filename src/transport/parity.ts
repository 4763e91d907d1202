// Why this file exists: forward error correction for the moments a lost segment costs more than
// bytes do (a migration's switchover: the guest is paused while its last pages cross a lossy
// link). A segment lost inside one TCP connection holds every later byte of that connection until
// its sender notices, a round trip or more later (on wan-10 in the pause, with the queue, about
// 200–300 ms), and the receiver's in-order channel waits for it. A PARITY frame (protocol.ts)
// is the XOR of up to `k` DATA frames written to distinct connections: when one connection
// stalls, each stripe misses at most one member, and the receiver rebuilds it from the others as
// soon as they and the parity arrived. Cost: about 1/k more bytes while it is switched on.
//
// Sender: `Striper` groups frames as the session writes them (a stripe closes at k members, when
// a frame would go to a connection already in it, or a few ms after its first member) and says
// which connections may carry its parity. Receiver: `Rebuilder` keeps recent DATA frames (bounded
// by bytes) and pending stripes, and returns a member once it is the only one missing.
import { Decoder, encode, FrameType, type Frame } from './protocol.js';

/** A DATA frame as both ends encode it for parity: the ack field (which differs per write) is 0. */
export function canonical(f: Frame): Buffer {
  return encode({ ...f, ack: 0n });
}

export interface ParityGroup {
  members: { seq: bigint; length: number }[];
  xor: Buffer;
}

export function encodeParity(frames: Frame[]): Buffer {
  const enc = frames.map(canonical);
  const width = Math.max(...enc.map((b) => b.length));
  const head = Buffer.alloc(2 + enc.length * 12);
  head.writeUInt16BE(enc.length, 0);
  frames.forEach((f, i) => {
    head.writeBigUInt64BE(f.seq, 2 + i * 12);
    head.writeUInt32BE(enc[i]!.length, 10 + i * 12);
  });
  const xor = Buffer.alloc(width);
  for (const b of enc) xorInto(xor, b);
  return Buffer.concat([head, xor]);
}

/** Parses a PARITY payload; undefined when malformed (the frame is then ignored). */
export function decodeParity(p: Buffer): ParityGroup | undefined {
  if (p.length < 2) return undefined;
  const n = p.readUInt16BE(0);
  if (n < 1 || n > MAX_MEMBERS || p.length < 2 + n * 12) return undefined;
  const members = Array.from({ length: n }, (_, i) => ({ seq: p.readBigUInt64BE(2 + i * 12), length: p.readUInt32BE(10 + i * 12) }));
  const xor = p.subarray(2 + n * 12);
  if (members.some((m) => m.length > xor.length)) return undefined;
  return { members, xor };
}

function xorInto(acc: Buffer, b: Buffer): void {
  const n = b.length;
  let i = 0;
  // 4 bytes at a time where both are aligned views; the rest byte by byte.
  if (acc.byteOffset % 4 === 0 && b.byteOffset % 4 === 0) {
    const a32 = new Uint32Array(acc.buffer, acc.byteOffset, n >>> 2);
    const b32 = new Uint32Array(b.buffer, b.byteOffset, n >>> 2);
    for (; i < a32.length; i++) a32[i]! ^= b32[i]!;
    i <<= 2;
  }
  for (; i < n; i++) acc[i]! ^= b[i]!;
}

export const MAX_MEMBERS = 64;

/** Sender side: forms stripes of frames written to distinct connections. */
export class Striper<C> {
  private members: Frame[] = [];
  private conns = new Set<C>();
  private openedAt = 0;
  private widest = 0;

  /** k: members per stripe; holdMs: a stripe closes this long after its first member at the latest */
  constructor(public k: number, private readonly holdMs: number) {}

  /**
   * Notes a DATA frame just written to `conn`. Returns a stripe that had to close first (its
   * parity must go out on a connection not in `conns`), or undefined.
   */
  add(f: Frame, conn: C, now: number): { frames: Frame[]; conns: Set<C> } | undefined {
    // The parity is as long as the longest member: a frame more than twice as long as those so
    // far starts a stripe of its own instead of padding theirs.
    const grows = this.members.length > 0 && f.payload.length > 2 * this.widest + 256;
    const closed = this.members.length && (this.conns.has(conn) || this.members.length >= this.k || grows) ? this.take() : undefined;
    this.widest = Math.max(closed || !this.members.length ? 0 : this.widest, f.payload.length);
    if (!this.members.length) this.openedAt = now;
    this.members.push(f);
    this.conns.add(conn);
    return closed;
  }

  /** The open stripe, if it is due (or `force`), to be sent now. */
  due(now: number, force = false): { frames: Frame[]; conns: Set<C> } | undefined {
    if (!this.members.length) return undefined;
    if (!force && this.members.length < this.k && now - this.openedAt < this.holdMs) return undefined;
    return this.take();
  }

  get open(): number {
    return this.members.length;
  }

  /** the connections the open stripe already uses */
  usedConns(): ReadonlySet<C> {
    return this.conns;
  }

  private take(): { frames: Frame[]; conns: Set<C> } {
    const out = { frames: this.members, conns: this.conns };
    this.members = [];
    this.conns = new Set();
    return out;
  }
}

/** Receiver side: rebuilds a DATA frame that is the only missing member of a stripe. */
export class Rebuilder {
  private readonly recent = new Map<bigint, Frame>();
  private recentBytes = 0;
  /** stripes waiting for members, by member seq */
  private readonly pending = new Map<bigint, ParityGroup>();
  private groups: ParityGroup[] = [];

  /** budget: bytes of recent frames kept for rebuilding */
  constructor(private readonly budget = 8 << 20) {}

  /** Keeps a received DATA frame while stripes may still need it. */
  keep(f: Frame): void {
    if (this.recent.has(f.seq)) return;
    this.recent.set(f.seq, f);
    this.recentBytes += f.payload.length + 40;
    for (const [seq, old] of this.recent) {
      if (this.recentBytes <= this.budget && this.recent.size <= 4096) break;
      this.recent.delete(seq);
      this.recentBytes -= old.payload.length + 40;
    }
  }

  /**
   * A parity group arrived, or (`seq`) a frame that may complete a pending one. `has` says
   * whether a seq was received. Returns rebuilt frames (each decoded and CRC-checked).
   */
  offer(g: ParityGroup | undefined, has: (seq: bigint) => boolean, seq?: bigint): Frame[] {
    const out: Frame[] = [];
    const tryGroup = (grp: ParityGroup): boolean => {
      const missing = grp.members.filter((m) => !has(m.seq));
      if (missing.length === 0) return true;
      if (missing.length > 1) return false;
      const m = missing[0]!;
      const acc = Buffer.from(grp.xor);
      for (const o of grp.members) {
        if (o === m) continue;
        const f = this.recent.get(o.seq);
        if (!f) return true; // a member is gone from memory: this stripe cannot help any more
        xorInto(acc, canonical(f));
      }
      try {
        const f = new Decoder().pushOne(acc.subarray(0, m.length));
        if (f && f.type === FrameType.DATA && f.seq === m.seq) out.push(f);
      } catch {
        // the XOR did not give a valid frame (a member differed): ignore the stripe
      }
      return true;
    };
    if (g && !tryGroup(g)) {
      this.groups.push(g);
      for (const m of g.members) this.pending.set(m.seq, g);
      if (this.groups.length > 256) this.drop(this.groups[0]!);
    }
    if (seq !== undefined) {
      const p = this.pending.get(seq);
      if (p && tryGroup(p)) this.drop(p);
    }
    return out;
  }

  private drop(g: ParityGroup): void {
    this.groups = this.groups.filter((x) => x !== g);
    for (const m of g.members) if (this.pending.get(m.seq) === g) this.pending.delete(m.seq);
  }
}
