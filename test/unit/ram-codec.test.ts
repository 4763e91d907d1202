// The page-delta codec of the RAM channel (src/migration/ram-codec.ts) on synthetic QEMU streams:
// the destination rebuilds the stream byte for byte however the transport cuts it, re-sent pages
// cross as deltas, a cache smaller than what was sent still round-trips, and a malformed message
// is refused with TRANSPORT_PROTOCOL. Against a real QEMU stream: test/integration/migration-stream.test.ts.
import { describe, expect, it } from 'vitest';
import { RamDecoder, RamEncoder } from '../../src/migration/ram-codec.js';
import { end, EOS, head, MiB, page, part, u32, u64, u8, zero } from './fixtures/qemu-stream.js';

/** A 4 KiB page of pseudo-random words with zeros between, then with `changes` of them altered. */
function kernelPage(seed: number, changes = 0): Buffer {
  const b = Buffer.alloc(4096);
  let s = seed;
  for (let i = 0; i < 1024; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    if (i < 700 && i % 3) b.writeUInt32LE(s, i * 4); // a third of the words zero, and the page's end
  }
  for (let c = 0; c < changes; c++) b.writeUInt32LE(0xdead0000 + c, ((seed * 7 + c * 131) % 1024) * 4);
  return b;
}

/** Two iterations over the same pages (the second changes a few words of each), then the end. */
function stream(): Buffer {
  const first = [page(0, kernelPage(1), 'pc.ram'), page(4096, kernelPage(2)), page(8192, kernelPage(3)), zero(MiB), page(0, 9, 'vga'), page(2 * MiB, kernelPage(4), 'pc.ram')];
  const second = [page(0, kernelPage(1, 2), 'pc.ram'), page(4096, kernelPage(2, 1)), page(8192, kernelPage(3, 3)), page(12288, kernelPage(5)), page(0, 9, 'vga')];
  return Buffer.concat([head(), part(...first), part(...second), end(page(2 * MiB, kernelPage(4, 1), 'pc.ram'))]);
}

function roundTrip(s: Buffer, cut: (i: number) => number, cache?: number): { out: Buffer; enc: RamEncoder } {
  const enc = new RamEncoder(cache);
  const dec = new RamDecoder(cache);
  const outs: Buffer[] = [];
  for (let pos = 0, i = 0; pos < s.length; i++) {
    const n = cut(i);
    outs.push(dec.push(enc.push(s.subarray(pos, pos + n))));
    pos += n;
  }
  outs.push(dec.push(enc.end()));
  return { out: Buffer.concat(outs), enc };
}

describe('RAM page-delta codec', () => {
  const s = stream();

  for (const [name, cut] of [['whole', () => s.length], ['every byte', () => 1], ['every 7 bytes', () => 7], ['random cuts', () => 1 + Math.floor(Math.random() * 9000)]] as const) {
    it(`rebuilds the stream byte for byte, cut ${name}`, () => {
      const { out } = roundTrip(s, cut);
      expect(out.equals(s)).toBe(true);
    });
  }

  it('sends a re-sent page as its few changed words', () => {
    const once = Buffer.concat([head(), part(page(0, kernelPage(1), 'pc.ram'))]);
    const twice = Buffer.concat([once, part(page(0, kernelPage(1, 2), 'pc.ram'))]);
    const a = roundTrip(once, () => once.length).enc.encodedBytes;
    const b = roundTrip(twice, () => twice.length).enc.encodedBytes;
    expect(b - a).toBeLessThan(64); // the second copy: op, header, two words (was 4 KiB + header)
    expect(a).toBeLessThan(once.length - 1200); // the first: its last 324 words are zero, left out
  });

  it('rebuilds re-sent pages whatever their changes: runs at either end, single unchanged words between', () => {
    const base = kernelPage(7);
    const variants = [[0], [1023], [0, 1023], [5, 7, 9], [5, 6, 8, 9], [100, 102, 104, 200], Array.from({ length: 1024 }, (_, i) => i), Array.from({ length: 512 }, (_, i) => 2 * i)];
    for (let t = 0; t < 40; t++) variants.push(Array.from({ length: 1 + Math.floor(Math.random() * 60) }, () => Math.floor(Math.random() * 1024)));
    const pages = variants.map((words, v) => {
      const p = Buffer.from(base);
      for (const w of words) p.writeUInt32LE((p.readUInt32LE(w * 4) ^ (0x9e3779b9 + v)) >>> 0, w * 4);
      return page(0, p, 'pc.ram');
    });
    const s2 = Buffer.concat([head(), part(page(0, base, 'pc.ram')), ...pages.map((p) => part(p)), end()]);
    expect(roundTrip(s2, () => 4099).out.equals(s2)).toBe(true);
  });

  it('round-trips with a cache smaller than what was sent (least recently sent pages leave)', () => {
    for (const cache of [4096, 2 * 4096, 3 * 4096]) {
      const { out } = roundTrip(s, () => 5000, cache);
      expect(out.equals(s)).toBe(true);
    }
  });

  it('passes a stream it cannot read through as it is', () => {
    const odd = Buffer.concat([head(), part(page(0, kernelPage(1), 'pc.ram')), u8(0x02), u32(2), u64(0x40 | 0x20), Buffer.alloc(5000, 3)]);
    const { out, enc } = roundTrip(odd, () => 999);
    expect(out.equals(odd)).toBe(true);
    expect(enc.encodedBytes).toBeGreaterThan(5000);
  });

  it('refuses a malformed message with TRANSPORT_PROTOCOL', () => {
    const bad = (m: Buffer) => expect(() => new RamDecoder(4096).push(m)).toThrow(expect.objectContaining({ code: 'TRANSPORT_PROTOCOL' }));
    bad(Buffer.from([0x7f])); // unknown op
    bad(Buffer.from([0x01, 10, 1, 2])); // RAW cut short
    bad(Buffer.from([0x10, 8, ...u64(0x28)])); // a page before any block
    bad(Buffer.concat([Buffer.from([0x02, 6]), Buffer.from('pc.ram'), Buffer.from([0x12, 8]), u64(0x28), Buffer.from([0, 0])])); // a delta for a page never seen
    bad(Buffer.concat([Buffer.from([0x02, 6]), Buffer.from('pc.ram'), Buffer.from([0x10, 8]), u64(0x28), Buffer.from([0x80, 0x10, 1])])); // a page body over 4096 bytes
  });

  it('hands a large message to the destination in pieces of its own buffers, reused once written', () => {
    // 300 pages (~1.2 MB of stream) in one message, then a RAW op larger than a piece.
    const pages = Array.from({ length: 300 }, (_, i) => page(i * 4096, kernelPage(i + 1), i ? undefined : 'pc.ram'));
    const big = Buffer.concat([head(), part(...pages), u8(0x03), u32(2), EOS, u8(0x7e), u32(2), u8(0x04), Buffer.alloc(300 * 1024, 7)]);
    const enc = new RamEncoder();
    const msg = Buffer.concat([enc.push(big), enc.end()]);
    const dec = new RamDecoder();
    const pieces: Buffer[] = [];
    const buffers = new Set<ArrayBufferLike>();
    dec.pushTo(msg, (b) => {
      buffers.add(b.buffer);
      pieces.push(Buffer.from(b)); // "written"
      dec.recycle(b);
    });
    expect(Buffer.concat(pieces).equals(big)).toBe(true);
    expect(pieces.length).toBeGreaterThan(4);
    for (const b of pieces.slice(0, -1)) expect(b.length).toBeLessThanOrEqual(256 * 1024 + 4096 + 16);
    expect(buffers.size).toBeLessThanOrEqual(3); // written pieces' buffers were reused (the RAW op is the message's own bytes)
    expect(dec.push(new RamEncoder().end()).length).toBe(0);
  });
});
