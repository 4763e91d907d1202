// Why this file exists: data reduction on the transport's send path and its inverse on receive.
// Per message: all zeros → ZERO (4 bytes); content the receiver holds → REF (its SHA-256,
// 32 bytes); otherwise zstd (zstd-napi; brotli q1 when the native module is missing), kept only
// when it saves ≥ 5 %. The sender mirrors the receiver's cache (same byte budget, both sides
// insert in the same seq order, no eviction) so a REF is sent only for content the receiver has.
import crypto from 'node:crypto';
import { createRequire } from 'node:module';
import zlib from 'node:zlib';
import { FerryError } from '../errors.js';
import { Flag } from './protocol.js';

interface Zstd {
  compress(b: Buffer, o?: { compressionLevel?: number }): Buffer;
  decompress(b: Buffer): Buffer;
}
let zstd: Zstd | null = null;
try {
  zstd = createRequire(import.meta.url)('zstd-napi') as Zstd;
} catch {
  zstd = null; // brotli fallback
}

const MIN_DEDUP = 4096;

export function sha256(b: Buffer): Buffer {
  return crypto.createHash('sha256').update(b).digest();
}

function isZero(b: Buffer): boolean {
  // Compare against a zero slab: Buffer.compare runs in native code.
  for (let off = 0; off < b.length; off += ZERO.length) {
    const n = Math.min(ZERO.length, b.length - off);
    if (b.compare(ZERO, 0, n, off, off + n) !== 0) return false;
  }
  return true;
}
const ZERO = Buffer.alloc(64 * 1024);

/** Content the receiver holds, keyed by hex SHA-256; bounded by a byte budget, no eviction. */
export class ContentCache {
  private readonly map = new Map<string, Buffer | true>();
  private bytes = 0;

  constructor(readonly budget: number, private readonly keepData: boolean) {}

  has(h: Buffer): boolean {
    return this.map.has(h.toString('hex'));
  }

  get(h: Buffer): Buffer | undefined {
    const v = this.map.get(h.toString('hex'));
    return v === true ? undefined : v;
  }

  /** Adds content if the budget allows; returns whether it was added. */
  add(h: Buffer, data: Buffer): boolean {
    const k = h.toString('hex');
    if (this.map.has(k)) return true;
    if (this.bytes + data.length > this.budget) return false;
    this.map.set(k, this.keepData ? data : true);
    this.bytes += data.length;
    return true;
  }

  /** Marks content the peer advertised it holds outside this cache (templates, backups). */
  advertise(h: Buffer): void {
    this.map.set(h.toString('hex'), true);
  }
}

export interface ReduceOptions {
  compress: boolean;
  level: number;
  dedup: boolean;
}

export interface Reduced {
  flags: number;
  payload: Buffer;
}

/** Sender side. `peer` mirrors what the receiver holds. */
export function reduce(msg: Buffer, o: ReduceOptions, peer: ContentCache): Reduced {
  if (msg.length >= 64 && isZero(msg)) {
    const p = Buffer.alloc(4);
    p.writeUInt32BE(msg.length);
    return { flags: Flag.ZERO, payload: p };
  }
  let flags = 0;
  if (o.dedup && msg.length >= MIN_DEDUP) {
    const h = sha256(msg);
    if (peer.has(h)) return { flags: Flag.REF, payload: h };
    if (peer.add(h, msg)) flags |= Flag.CACHE;
  }
  if (o.compress && msg.length >= 512) {
    const c = zstd ? zstd.compress(msg, { compressionLevel: o.level }) : zlib.brotliCompressSync(msg, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 1 } });
    if (c.length < msg.length * 0.95) return { flags: flags | (zstd ? Flag.ZSTD : Flag.BROTLI), payload: c };
  }
  return { flags, payload: msg };
}

/** Receiver side. `cache` holds content for REFs (and, via `external`, templates/backups). */
export function expand(flags: number, payload: Buffer, cache: ContentCache, external?: (h: Buffer) => Buffer | undefined): Buffer {
  if (flags & Flag.ZERO) {
    if (payload.length !== 4) throw new FerryError('TRANSPORT_PROTOCOL', 'ZERO frame payload must be 4 bytes');
    const n = payload.readUInt32BE(0);
    if (n > 64 * 1024 * 1024) throw new FerryError('TRANSPORT_PROTOCOL', `ZERO length ${n} too large`);
    return Buffer.alloc(n);
  }
  if (flags & Flag.REF) {
    if (payload.length !== 32) throw new FerryError('TRANSPORT_PROTOCOL', 'REF frame payload must be 32 bytes');
    const d = cache.get(payload) ?? external?.(payload);
    if (!d) throw new FerryError('TRANSPORT_PROTOCOL', `REF to content not held: ${payload.toString('hex').slice(0, 16)}…`);
    return d;
  }
  let msg = payload;
  if (flags & Flag.ZSTD) {
    if (!zstd) throw new FerryError('TRANSPORT_PROTOCOL', 'peer sent zstd but zstd-napi is not available here');
    msg = zstd.decompress(payload);
  } else if (flags & Flag.BROTLI) {
    msg = zlib.brotliDecompressSync(payload, { maxOutputLength: 8 * 1024 * 1024 });
  }
  if (flags & Flag.CACHE) cache.add(sha256(msg), msg);
  return msg;
}
