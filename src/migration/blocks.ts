// Why this file exists: block arithmetic shared by both ends of a disk copy — turning extent maps
// into aligned pieces, and the two-level hash list (chunk hashes → group hashes) that verifies a
// destination disk against the source without moving the data. Pure except `groupHashes`, which
// reads through an NBD client.
import crypto from 'node:crypto';
import type { BaseHashes } from './base-hashes.js';
import type { Extent, NbdClient } from '../nbd/client.js';

/** Bytes per disk record and per hashed chunk. */
export const CHUNK = 64 * 1024;
/** Chunks per verification group: one 32-byte hash crosses the WAN per MiB of disk. */
export const GROUP = 16;

export interface Range {
  offset: number;
  length: number;
}

/** Merges touching or overlapping ranges (input in any order). */
export function mergeRanges(rs: Range[]): Range[] {
  const sorted = rs.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: Range[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** Splits ranges at every multiple of `size`, so no piece crosses a chunk boundary. */
export function splitAligned(rs: Range[], size = CHUNK): Range[] {
  const out: Range[] = [];
  for (const r of mergeRanges(rs)) {
    let off = r.offset;
    const end = r.offset + r.length;
    while (off < end) {
      const next = Math.min(end, (Math.floor(off / size) + 1) * size);
      out.push({ offset: off, length: next - off });
      off = next;
    }
  }
  return out;
}

export function totalBytes(rs: Range[]): number {
  return rs.reduce((a, r) => a + r.length, 0);
}

/** Extents whose flags satisfy `pred`, as ranges. */
export function select(extents: Extent[], pred: (flags: number) => boolean): Range[] {
  return mergeRanges(extents.filter((e) => pred(e.flags)).map((e) => ({ offset: e.offset, length: e.length })));
}

/** The ranges of whole groups, for re-sending groups whose hashes differ. */
export function groupRanges(groups: number[], size: number, chunk = CHUNK, group = GROUP): Range[] {
  const g = chunk * group;
  return mergeRanges(groups.map((i) => ({ offset: i * g, length: Math.min(g, size - i * g) })).filter((r) => r.length > 0));
}

export function groupCount(size: number, chunk = CHUNK, group = GROUP): number {
  return Math.ceil(size / (chunk * group));
}

const zeroHashes = new Map<number, Buffer>();
function zeroHash(len: number): Buffer {
  let h = zeroHashes.get(len);
  if (!h) zeroHashes.set(len, (h = crypto.createHash('sha256').update(Buffer.alloc(len)).digest()));
  return h;
}

export function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8192) {
    const end = Math.min(b.length, i + 8192);
    for (let j = i; j < end; j++) if (b[j] !== 0) return false;
  }
  return true;
}

/** True when [off, off+len) lies entirely inside the (sorted, merged) ranges. */
function covered(zero: Range[], off: number, len: number): boolean {
  let lo = 0;
  let hi = zero.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const z = zero[mid]!;
    if (z.offset + z.length <= off) lo = mid + 1;
    else if (z.offset > off) hi = mid - 1;
    else return off + len <= z.offset + z.length;
  }
  return false;
}

/**
 * Group hashes of a disk read through `nbd`: for each requested group, SHA-256 over the SHA-256
 * of each of its chunks. Chunks inside `knownZero` (base:allocation says they read as zeroes)
 * hash as zeroes without being read. Both ends compute exactly this, so equal hashes mean equal
 * content. With `base`, a group lying entirely in `fromBase` (the overlay's own layer does not
 * touch it, so it reads as the template does) takes
 * its hash from the template's cache, or computes it and adds it there (base-hashes.ts).
 */
export async function groupHashes(nbd: NbdClient, size: number, groups: number[], knownZero: Range[], chunk = CHUNK, group = GROUP, base?: { fromBase: Range[]; cache: BaseHashes }): Promise<Buffer[]> {
  const zero = mergeRanges(knownZero);
  const fromBase = base ? mergeRanges(base.fromBase) : [];
  const one = async (g: number): Promise<Buffer> => {
    const start = g * group * chunk;
    const cached = base && start < size && covered(fromBase, start, Math.min(group * chunk, size - start));
    const known = cached ? base.cache.get(g) : undefined;
    if (known) return known;
    // Chunks not known to be zero, read as runs of adjacent chunks (one NBD read each).
    const hashes: Buffer[] = [];
    const runs: { first: number; offset: number; length: number }[] = [];
    for (let c = 0; c < group; c++) {
      const off = start + c * chunk;
      if (off >= size) break;
      const len = Math.min(chunk, size - off);
      if (covered(zero, off, len)) {
        hashes.push(zeroHash(len));
        continue;
      }
      hashes.push(EMPTY);
      const last = runs[runs.length - 1];
      if (last && last.offset + last.length === off) last.length += len;
      else runs.push({ first: c, offset: off, length: len });
    }
    await Promise.all(
      runs.map(async (r) => {
        const data = await nbd.read(r.offset, r.length);
        for (let o = 0, c = r.first; o < r.length; o += chunk, c++) hashes[c] = crypto.createHash('sha256').update(data.subarray(o, Math.min(o + chunk, r.length))).digest();
      }),
    );
    const h = crypto.createHash('sha256').update(Buffer.concat(hashes)).digest();
    if (cached) base.cache.set(g, h);
    return h;
  };
  // Several groups in flight: the reads of one overlap the hashing of another.
  const out = new Array<Buffer>(groups.length);
  let next = 0;
  const lane = async () => {
    for (let i = next++; i < groups.length; i = next++) out[i] = await one(groups[i]!);
  };
  await Promise.all(Array.from({ length: Math.max(4, Math.ceil(16 / group)) }, lane));
  return out;
}

const EMPTY = Buffer.alloc(0);

export const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest();
