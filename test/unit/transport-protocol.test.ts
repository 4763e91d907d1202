// The transport wire format: golden bytes, round trips, fragmentation, and rejection of
// corrupted, forged and truncated input; plus a fuzz run of the decoder (1e6 inputs); PARITY
// stripes (any one missing member rebuilt, byte for byte).
import { describe, expect, it } from 'vitest';
import { decodeParity, encodeParity, Rebuilder, Striper } from '../../src/transport/parity.js';
import { Decoder, encode, Flag, FrameType, HEADER, MAX_PAYLOAD, type Frame } from '../../src/transport/protocol.js';
import { ContentCache, expand, reduce } from '../../src/transport/reduce.js';

const f: Frame = { type: FrameType.DATA, channel: 3, flags: Flag.CACHE, seq: 258n, ack: 7n, cseq: 9n, payload: Buffer.from('ferry') };

describe('frame encoding', () => {
  it('matches the golden bytes of the spec', () => {
    // version 1 | type DATA | channel 3 | flags CACHE | seq 258 | ack 7 | cseq 9 | length 5 | CRC-32 | "ferry"
    expect(encode(f).toString('hex')).toBe('01' + '03' + '0003' + '00000010' + '0000000000000102' + '0000000000000007' + '0000000000000009' + '00000005' + '8b67b27a' + '6665727279');
    expect(encode({ ...f, payload: Buffer.alloc(0), type: FrameType.ACK, flags: 0, channel: 0, seq: 0n, cseq: 0n }).length).toBe(HEADER);
  });

  it('round-trips, whole or one byte at a time', () => {
    const frames = [f, { ...f, seq: 259n, cseq: 10n, payload: Buffer.alloc(70_000, 1) }, { ...f, type: FrameType.PING, flags: 0, cseq: 0n, payload: Buffer.alloc(8) }];
    const wire = Buffer.concat(frames.map(encode));
    expect(new Decoder().push(wire)).toEqual(frames);
    const d = new Decoder();
    const got: Frame[] = [];
    for (let i = 0; i < wire.length; i++) got.push(...d.push(wire.subarray(i, i + 1)));
    expect(got).toEqual(frames);
  });

  const bad = (mut: (b: Buffer) => void, msg: RegExp) => {
    const b = encode(f);
    mut(b);
    expect(() => new Decoder().push(b)).toThrow(msg);
  };
  it('rejects a corrupted payload or header (CRC)', () => {
    bad((b) => (b[HEADER] ^= 1), /checksum/);
    bad((b) => (b[9] ^= 1), /checksum/);
  });
  it('rejects version 0 and unknown versions, type 0 and unknown types, unknown flags', () => {
    bad((b) => (b[0] = 0), /version 0/);
    bad((b) => (b[0] = 2), /version 2/);
    bad((b) => (b[1] = 0), /type 0/);
    bad((b) => (b[1] = 99), /type 99/);
    bad((b) => (b[1] = 9), /type 9/);
    bad((b) => b.writeUInt32BE(64, 4), /flags/);
  });
  it('rejects an oversized length before buffering it', () => {
    bad((b) => b.writeUInt32BE(MAX_PAYLOAD + 1, 32), /exceeds/);
  });
  it('waits on a truncated frame without producing anything', () => {
    const d = new Decoder();
    expect(d.push(encode(f).subarray(0, HEADER + 2))).toEqual([]);
  });

  it('fuzz: 1e6 random and mutated inputs never crash, hang or grow memory without bound', () => {
    let seed = 12345;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const valid = [encode(f), encode({ ...f, payload: Buffer.alloc(300, 9) }), encode({ ...f, type: FrameType.HELLO, flags: 0, payload: Buffer.from('{"session":"00"}') })];
    let frames = 0;
    let errors = 0;
    for (let i = 0; i < 1_000_000; i++) {
      let input: Buffer;
      if (i % 2) {
        input = Buffer.from(valid[i % valid.length]!);
        const flips = 1 + Math.floor(rnd() * 3);
        for (let k = 0; k < flips; k++) input[Math.floor(rnd() * input.length)] ^= 1 << Math.floor(rnd() * 8);
        if (rnd() < 0.3) input = input.subarray(0, Math.floor(rnd() * input.length));
      } else {
        input = Buffer.alloc(1 + Math.floor(rnd() * 64));
        for (let k = 0; k < input.length; k++) input[k] = Math.floor(rnd() * 256);
        if (rnd() < 0.5) input[0] = 1;
      }
      const d = new Decoder();
      try {
        frames += d.push(input).length;
      } catch (e) {
        expect((e as { code?: string }).code).toBe('TRANSPORT_PROTOCOL');
        errors++;
      }
      expect(d.buffered).toBeLessThanOrEqual(HEADER + MAX_PAYLOAD);
    }
    expect(errors).toBeGreaterThan(400_000);
    expect(frames).toBeGreaterThanOrEqual(0);
  }, 120_000);
});

describe('data reduction', () => {
  const opts = { compress: true, level: 3, dedup: true };
  it('elides zero blocks, dedups repeats by hash, compresses text, and expands exactly', () => {
    const peer = new ContentCache(1 << 20, false);
    const mine = new ContentCache(1 << 20, true);
    const zero = Buffer.alloc(65536);
    const text = Buffer.from('the quick brown fox jumps over the lazy dog\n'.repeat(200));
    const rand = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 2654435761) >>> 24));
    const seq = [zero, text, rand, text, rand];
    const red = seq.map((m) => reduce(m, opts, peer));
    expect(red[0]!.flags & Flag.ZERO).toBeTruthy();
    expect(red[0]!.payload.length).toBe(4);
    expect(red[1]!.flags & Flag.CACHE).toBeTruthy();
    expect(red[1]!.payload.length).toBeLessThan(text.length / 10);
    expect(red[3]!.flags).toBe(Flag.REF);
    expect(red[4]!.flags).toBe(Flag.REF);
    const back = red.map((r) => expand(r.flags, r.payload, mine));
    back.forEach((b, i) => expect(b.equals(seq[i]!)).toBe(true));
  });
  it('refuses a REF to content the receiver does not hold', () => {
    expect(() => expand(Flag.REF, Buffer.alloc(32, 1), new ContentCache(1024, true))).toThrow(/not held/);
  });
  it('stops caching at the byte budget on both sides alike', () => {
    const peer = new ContentCache(10_000, false);
    const a = Buffer.alloc(8192, 1);
    const b = Buffer.alloc(8192, 2);
    expect(reduce(a, opts, peer).flags & Flag.CACHE).toBeTruthy();
    expect(reduce(b, opts, peer).flags & Flag.CACHE).toBeFalsy();
    expect(reduce(b, opts, peer).flags & Flag.REF).toBeFalsy();
  });
});

describe('parity (forward error correction)', () => {
  const frames: Frame[] = Array.from({ length: 5 }, (_, i) => ({ type: FrameType.DATA, channel: 2, flags: i % 2 ? Flag.ZSTD : 0, seq: 100n + BigInt(i), ack: BigInt(i * 7), cseq: 50n + BigInt(i), payload: Buffer.alloc(10 + i * 333, i + 1) }));

  it('rebuilds whichever single member is missing, whatever the acks it was written with', () => {
    const g = decodeParity(encodeParity(frames))!;
    expect(g.members.map((m) => m.seq)).toEqual(frames.map((x) => x.seq));
    for (let lost = 0; lost < frames.length; lost++) {
      const r = new Rebuilder();
      for (const x of frames) if (x.seq !== frames[lost]!.seq) r.keep({ ...x, ack: 999n });
      const got = r.offer(g, (s) => s !== frames[lost]!.seq);
      expect(got).toEqual([{ ...frames[lost]!, ack: 0n }]);
    }
  });

  it('waits while two members are missing and rebuilds the second once the first arrives', () => {
    const r = new Rebuilder();
    const have = new Set<bigint>([100n, 101n, 102n]);
    for (const x of frames.slice(0, 3)) r.keep(x);
    expect(r.offer(decodeParity(encodeParity(frames)), (s) => have.has(s))).toEqual([]);
    have.add(103n);
    r.keep(frames[3]!);
    expect(r.offer(undefined, (s) => have.has(s), 103n).map((x) => x.seq)).toEqual([104n]);
  });

  it('ignores malformed parity and a stripe whose XOR does not give a valid frame', () => {
    expect(decodeParity(Buffer.alloc(1))).toBeUndefined();
    expect(decodeParity(Buffer.from([0, 0]))).toBeUndefined();
    const p = encodeParity(frames);
    p[2 + 5 * 12 + 45]! ^= 0xff; // corrupts the XOR inside member 100's bytes: it fails its CRC
    const r = new Rebuilder();
    for (const x of frames.slice(1)) r.keep(x);
    expect(r.offer(decodeParity(p), (s) => s !== 100n)).toEqual([]);
  });

  it('closes a stripe at k members, on a repeated connection, or when it is due', () => {
    const even = frames.map((x) => ({ ...x, payload: Buffer.alloc(100, 1) }));
    const s = new Striper<string>(3, 8);
    expect(s.add(even[0]!, 'a', 0)).toBeUndefined();
    expect(s.add(even[1]!, 'b', 1)).toBeUndefined();
    const c = s.add(even[2]!, 'a', 2)!; // 'a' again: the stripe so far closes
    expect(c.frames.map((x) => x.seq)).toEqual([100n, 101n]);
    expect([...c.conns]).toEqual(['a', 'b']);
    expect(s.due(5)).toBeUndefined();
    expect(s.due(11)!.frames.map((x) => x.seq)).toEqual([102n]);
    s.add(even[0]!, 'a', 20);
    s.add(even[1]!, 'b', 20);
    s.add(even[2]!, 'c', 20);
    expect(s.add(even[3]!, 'd', 20)!.frames.length).toBe(3);
    // frames[4] (1 372 B) is more than twice frames[0] (10 B): it does not pad that stripe
    const w = new Striper<string>(8, 8);
    w.add(frames[0]!, 'a', 0);
    expect(w.add(frames[4]!, 'b', 0)!.frames.map((x) => x.seq)).toEqual([100n]);
    expect(w.add(frames[0]!, 'c', 0)).toBeUndefined(); // a short one may join a wide stripe
  });
});
