// Why this file exists: most of what QEMU re-sends in a pre-copy iteration, and in the pause, is
// pages the destination already holds an older copy of, changed in a few words (kernel pages: a
// counter, a list pointer), or pages that are almost all zero. zstd sees each page alone and
// keeps ~420 bytes of a kernel page whose delta is ~70. This codec, on the RAM channel, replaces
// each page record of QEMU's stream by the page's XOR with the copy both agents last saw
// (or, for a page not seen, the page itself), with its zero words left out. The destination
// rebuilds QEMU's stream byte for byte: the stream's hash (`ram-end`) is still checked against
// what the destination fed its QEMU, so a codec fault fails the migration, never the guest.
// QEMU's own XBZRLE does the same inside QEMU, but corrupted guests under TCG here
// (docs/benchmarks.md); this one cannot change what QEMU sent. Measured on QEMU's last pass at a
// switchover (17.7 MB: the scenario's 16 MiB dirtier and 167 kernel pages): 147–152 KB after
// zstd as it was, 69 KB encoded.
//
// Both sides keep the same page cache (page-cache.ts): every page record, in stream order, updates
// its slot (most recently sent last; the least recently sent is evicted when full). Its contents
// are a pure function of the stream, so the two caches agree without a word about them on the wire.
//
// Wire format (version 1), one message = whole ops, each op starting with its byte:
//   0x01 RAW    varint n, n bytes of the stream as they are (everything but PAGE records)
//   0x02 BLOCK  u8 len, RAM block name: the block of the following page ops (cache key)
//   0x10 | 1    PAGE, header = previous PAGE header's u64 + 4096 (else: varint n, n header bytes)
//        | 2    body is the XOR with the cached copy (else the page itself)
//        then the body: pairs (varint zero words, varint data words, data words × 4 bytes)
//        covering the page's 1024 words
// Zero is never an op. The page offset in a header is what QEMU wrote (u64 offset | flags).
import { FerryError } from '../errors.js';
import { MigrationStreamReader } from '../qemu/migration-stream.js';
import { PAGE, PageCache, WORDS } from './page-cache.js';

export const RAM_CODEC_VERSION = 1;
const Op = { RAW: 0x01, BLOCK: 0x02, PAGE: 0x10, NEXT: 0x01, DELTA: 0x02 } as const;
/** Default cache: 64 MiB on each side (the last 16384 pages sent). */
export const RAM_CODEC_CACHE = 64 * 2 ** 20;

/** Growable output buffer. */
class Out {
  buf: Buffer = Buffer.allocUnsafe(1 << 16);
  len = 0;
  room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    const b = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.len + n));
    this.buf.copy(b, 0, 0, this.len);
    this.buf = b;
  }
  byte(v: number): void {
    this.room(1);
    this.buf[this.len++] = v;
  }
  varint(v: number): void {
    this.room(5);
    while (v >= 0x80) {
      this.buf[this.len++] = (v & 0x7f) | 0x80;
      v >>>= 7;
    }
    this.buf[this.len++] = v;
  }
  bytes(b: Buffer): void {
    this.room(b.length);
    b.copy(this.buf, this.len);
    this.len += b.length;
  }
  /** What was written, as a buffer of its own (a copy: this one is written on). */
  take(): Buffer {
    const r = Buffer.from(this.buf.subarray(0, this.len));
    this.len = 0;
    return r;
  }
}

/**
 * The decoder's output: pieces of about PIECE bytes, each in a buffer of its own that comes back
 * (`recycle`) once written. Measured in the wan-10 pause: a message's output copied into a new
 * buffer cost the destination 13 ms of its thread, and outputs of a few MB written straight
 * into new buffers 68 ms (each page of them faulted in afresh); a few warm buffers cost neither.
 */
class Pieces extends Out {
  private readonly spare: Buffer[] = [];
  constructor() {
    super();
    this.buf = Buffer.allocUnsafe(PIECE_CAP);
  }
  /** Hands the piece written so far over whole; writing goes on in a spare buffer. */
  override take(): Buffer {
    const r = this.buf.subarray(0, this.len);
    this.buf = this.spare.pop() ?? Buffer.allocUnsafe(PIECE_CAP);
    this.len = 0;
    return r;
  }
  recycle(b: Buffer): void {
    if (b.byteOffset === 0 && b.buffer.byteLength === PIECE_CAP && this.spare.length < 8) this.spare.push(Buffer.from(b.buffer));
  }
}
const PIECE = 256 * 1024;
/** a piece ends after the op that took it past PIECE: a page record, or a RAW op of one message at most */
const PIECE_CAP = 2 * PIECE;

/** Cache key of a page: its block's index (in order of first appearance) and page number. */
/** A page header's u64 as two u32 halves (numbers: BigInt costs a page's worth of time here). */
class Hdr {
  hi = -1;
  lo = 0;
  /** whether `b` (8 bytes) is this header + 4096 */
  isNext(b: Buffer, at: number): boolean {
    const lo = this.lo + PAGE;
    return this.hi >= 0 && b.readUInt32BE(at + 4) === lo % 2 ** 32 && b.readUInt32BE(at) === this.hi + Math.floor(lo / 2 ** 32);
  }
  set(b: Buffer, at: number): void {
    this.hi = b.readUInt32BE(at);
    this.lo = b.readUInt32BE(at + 4);
  }
  advance(): void {
    this.lo += PAGE;
    if (this.lo >= 2 ** 32) {
      this.lo -= 2 ** 32;
      this.hi++;
    }
  }
  /** page number within its block (the offset bits above the flags) */
  page(): number {
    return this.hi * 2 ** 20 + Math.floor(this.lo / PAGE);
  }
}

/** A page record the reader reported: its block, where its header and its bytes start. */
interface PendingPage {
  block: string;
  rec: number;
  at: number;
}

/**
 * Stream bytes received and not yet encoded: the chunks as they came (no copy), the first
 * starting at stream offset `at`.
 */
class Held {
  private segs: Buffer[] = [];
  at = 0;
  end = 0;

  add(b: Buffer): void {
    if (!b.length) return;
    this.segs.push(b);
    this.end += b.length;
  }

  /** Copies stream bytes [from, to) into `dst` at `off`. */
  copy(from: number, to: number, dst: Buffer, off: number): void {
    let segAt = this.at;
    for (const s of this.segs) {
      const segEnd = segAt + s.length;
      if (segEnd > from && segAt < to) {
        const a = Math.max(from, segAt) - segAt;
        const b = Math.min(to, segEnd) - segAt;
        s.copy(dst, off, a, b);
        off += b - a;
      }
      if (segEnd >= to) return;
      segAt = segEnd;
    }
  }

  /** Forgets everything before stream offset `to`. */
  drop(to: number): void {
    while (this.segs.length && this.at + this.segs[0]!.length <= to) this.at += this.segs.shift()!.length;
    if (this.segs.length && to > this.at) {
      this.segs[0] = this.segs[0]!.subarray(to - this.at);
      this.at = to;
    }
    if (!this.segs.length) this.at = this.end;
  }
}

/** Source side: QEMU's stream in, codec messages out. */
export class RamEncoder {
  private readonly reader: MigrationStreamReader;
  private readonly cache: PageCache;
  private readonly blocks = new Map<string, number>();
  private block = '';
  private pages: PendingPage[] = [];
  private readonly held = new Held();
  private blockIdx = -1;
  private readonly prevHdr = new Hdr();
  private readonly out = new Out();
  private readonly hdr = Buffer.alloc(8 + 1 + 255);
  private readonly scratch = new Int32Array(WORDS);
  private readonly scratchBytes = Buffer.from(this.scratch.buffer);
  private readonly delta = new Int32Array(WORDS);
  private readonly deltaBytes = Buffer.from(this.delta.buffer);
  /** message bytes out (for the progress and the benchmark) */
  encodedBytes = 0;

  constructor(cacheBytes = RAM_CODEC_CACHE) {
    this.cache = new PageCache(cacheBytes);
    this.reader = new MigrationStreamReader({
      page: (block, _offset, p, rec) => {
        if ('at' in p) this.pages.push({ block, rec, at: p.at });
      },
    });
  }

  /** Encodes what `chunk` completes; an incomplete page record waits for the next chunk. */
  push(chunk: Buffer): Buffer {
    this.reader.push(chunk);
    this.held.add(chunk);
    const end = this.held.end;
    const parsed = this.reader.stopped !== undefined || this.reader.finished ? end : this.reader.parsedTo;
    while (this.pages.length && this.pages[0]!.at + PAGE <= end) {
      const p = this.pages.shift()!;
      this.raw(p.rec);
      this.page(p);
      this.held.drop(p.at + PAGE);
    }
    this.raw(Math.min(this.pages.length ? this.pages[0]!.rec : parsed, end));
    return this.emit();
  }

  /** The stream ended: whatever is held goes as it is. */
  end(): Buffer {
    this.pages = [];
    this.raw(this.held.end);
    return this.emit();
  }

  private emit(): Buffer {
    const m = this.out.take();
    this.encodedBytes += m.length;
    return m;
  }

  /** The held stream bytes before `to` as a RAW op. */
  private raw(to: number): void {
    const from = this.held.at;
    if (to <= from) return;
    const o = this.out;
    o.byte(Op.RAW);
    o.varint(to - from);
    o.room(to - from);
    this.held.copy(from, to, o.buf, o.len);
    o.len += to - from;
    this.held.drop(to);
  }

  private page(p: PendingPage): void {
    const o = this.out;
    const hLen = p.at - p.rec;
    if (hLen > this.hdr.length) throw new FerryError('INTERNAL', `a RAM page header of ${hLen} bytes`);
    const hdr = this.hdr.subarray(0, hLen);
    this.held.copy(p.rec, p.at, hdr, 0);
    if (p.block !== this.block) {
      this.block = p.block;
      if (!this.blocks.has(p.block)) this.blocks.set(p.block, this.blocks.size);
      this.blockIdx = this.blocks.get(p.block)!;
      o.byte(Op.BLOCK);
      o.byte(p.block.length);
      o.bytes(Buffer.from(p.block, 'latin1'));
    }
    const next = hLen === 8 && this.prevHdr.isNext(hdr, 0);
    this.prevHdr.set(hdr, 0);
    const pageNo = this.prevHdr.page();
    const cached = this.cache.slot(this.blockIdx, pageNo) >= 0;
    const base = this.cache.claim(this.blockIdx, pageNo) * WORDS;
    // The page's words, aligned (the stream's chunks are not).
    this.held.copy(p.at, p.at + PAGE, this.scratchBytes, 0);
    o.byte(Op.PAGE | (next ? Op.NEXT : 0) | (cached ? Op.DELTA : 0));
    if (!next) {
      o.varint(hLen);
      o.bytes(hdr);
    }
    const page = this.scratch;
    const c = this.cache.words;
    if (cached) this.deltaBody(page, base);
    else {
      c.set(page, base);
      this.body(page, this.scratchBytes);
    }
  }

  /**
   * `body` of the page's XOR with its cached copy, and the cache takes the new content, in one
   * pass that reads each word pair once and writes only words that changed: a re-sent page
   * mostly did not (the benchmark's dirtier changes one word in 1024). Measured on a 16.8 MB
   * pass of such pages: 26–50 ms as an XOR pass then a scan, 10–14 ms as this.
   */
  private deltaBody(page: Int32Array, base: number): void {
    const o = this.out;
    const c = this.cache.words;
    o.room(PAGE + 3 * 512);
    const d = this.delta;
    let i = 0;
    while (i < WORDS) {
      const z0 = i;
      // The rest of the page unchanged? (memcmp: the common case after a data run.)
      if (this.scratchBytes.compare(this.cache.bytes, (base + i) * 4, (base + WORDS) * 4, i * 4, PAGE) === 0) i = WORDS;
      else while (i < WORDS && page[i] === c[base + i]) i++;
      const d0 = i;
      while (i < WORDS && (page[i] !== c[base + i] || (i + 1 < WORDS && page[i + 1] !== c[base + i + 1]))) {
        const x = page[i]!;
        d[i - d0] = x ^ c[base + i]!;
        c[base + i] = x;
        i++;
      }
      o.varint(d0 - z0);
      o.varint(i - d0);
      this.deltaBytes.copy(o.buf, o.len, 0, (i - d0) * 4);
      o.len += (i - d0) * 4;
    }
  }

  /** The words as (zero run, data run) pairs; a data run ends at two zero words in a row. */
  private body(w: Int32Array, bytes: Buffer): void {
    const o = this.out;
    o.room(PAGE + 3 * 512);
    let i = 0;
    while (i < WORDS) {
      const z0 = i;
      while (i < WORDS && w[i] === 0) i++;
      const d0 = i;
      while (i < WORDS && (w[i] !== 0 || (i + 1 < WORDS && w[i + 1] !== 0))) i++;
      o.varint(d0 - z0);
      o.varint(i - d0);
      bytes.copy(o.buf, o.len, d0 * 4, i * 4);
      o.len += (i - d0) * 4;
    }
  }
}

/** Destination side: codec messages in, QEMU's stream out, byte for byte. */
export class RamDecoder {
  private readonly cache: PageCache;
  private readonly blocks = new Map<string, number>();
  private blockIdx = -1;
  private readonly prevHdr = new Hdr();
  private readonly hdr8 = Buffer.alloc(8);
  private readonly out = new Pieces();
  /** one data run of a delta, aligned */
  private readonly run = new Int32Array(WORDS);
  private readonly runBytes = Buffer.from(this.run.buffer);

  constructor(cacheBytes = RAM_CODEC_CACHE) {
    this.cache = new PageCache(cacheBytes);
  }

  /** One message: the stream bytes it stands for. Throws TRANSPORT_PROTOCOL on a malformed one. */
  push(m: Buffer): Buffer {
    const parts: Buffer[] = []; // pieces not recycled are the caller's
    this.pushTo(m, (b) => parts.push(b));
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  /**
   * One message, its stream bytes handed to `emit` in pieces of about 256 KiB, in order; a piece
   * may be given back with `recycle` once written. Throws TRANSPORT_PROTOCOL on a malformed
   * message (the pieces emitted before are QEMU's stream as it was).
   */
  pushTo(m: Buffer, emit: (b: Buffer) => void): void {
    const o = this.out;
    const flush = () => o.len > 0 && emit(o.take());
    let p = 0;
    const need = (n: number) => {
      if (p + n > m.length) throw bad('a cut op');
    };
    const varint = () => {
      let v = 0;
      for (let shift = 0; ; shift += 7) {
        need(1);
        const b = m[p++]!;
        v += (b & 0x7f) * 2 ** shift;
        if (b < 0x80) return v;
        if (shift > 28) throw bad('a varint over 5 bytes');
      }
    };
    while (p < m.length) {
      const op = m[p++]!;
      if (op === Op.RAW) {
        const n = varint();
        need(n);
        if (o.len + n <= PIECE) o.bytes(m.subarray(p, p + n));
        else {
          flush();
          emit(m.subarray(p, p + n)); // as it came: no copy
        }
        p += n;
      } else if (op === Op.BLOCK) {
        need(1);
        const n = m[p++]!;
        need(n);
        const name = m.toString('latin1', p, p + n);
        p += n;
        if (!this.blocks.has(name)) this.blocks.set(name, this.blocks.size);
        this.blockIdx = this.blocks.get(name)!;
      } else if ((op & 0xf0) === Op.PAGE && op <= (Op.PAGE | Op.NEXT | Op.DELTA)) {
        if (this.blockIdx < 0) throw bad('a page before any block');
        let hdr: Buffer;
        if (op & Op.NEXT) {
          if (this.prevHdr.hi < 0) throw bad('a next page before any page');
          this.prevHdr.advance();
          hdr = this.hdr8;
          hdr.writeUInt32BE(this.prevHdr.hi, 0);
          hdr.writeUInt32BE(this.prevHdr.lo, 4);
        } else {
          const n = varint();
          if (n < 8) throw bad('a page header under 8 bytes');
          need(n);
          hdr = m.subarray(p, p + n);
          p += n;
          this.prevHdr.set(hdr, 0);
        }
        const pageNo = this.prevHdr.page();
        const delta = (op & Op.DELTA) !== 0;
        if (delta && this.cache.slot(this.blockIdx, pageNo) < 0) throw bad('a delta against a page this side never saw');
        // The page is rebuilt in its cache slot: a delta's data words are XORed into the copy
        // there, a whole page's written over zeros.
        const base = this.cache.claim(this.blockIdx, pageNo) * WORDS;
        const c = this.cache.words;
        if (!delta) c.fill(0, base, base + WORDS);
        for (let i = 0; i < WORDS; ) {
          i += varint();
          const n = varint();
          if (i + n > WORDS) throw bad('a page body over 4096 bytes');
          need(n * 4);
          if (delta) {
            m.copy(this.runBytes, 0, p, p + n * 4);
            const r = this.run;
            for (let k = 0; k < n; k++) c[base + i + k] = c[base + i + k]! ^ r[k]!;
          } else m.copy(this.cache.bytes, (base + i) * 4, p, p + n * 4);
          p += n * 4;
          i += n;
        }
        o.bytes(hdr);
        o.bytes(this.cache.bytes.subarray(base * 4, base * 4 + PAGE));
        if (o.len >= PIECE) flush();
      } else throw bad(`op 0x${op.toString(16)}`);
    }
    flush();
  }

  /** A piece `pushTo` emitted, written out: its buffer may be reused. */
  recycle(b: Buffer): void {
    this.out.recycle(b);
  }
}

const bad = (what: string) => new FerryError('TRANSPORT_PROTOCOL', `migration: RAM codec message with ${what}`);
