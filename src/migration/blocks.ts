// Why this file exists: block arithmetic shared by both ends of a disk copy — turning extent maps
// into aligned pieces, and the two-level hash list (chunk hashes → group hashes) that verifies a
// destination disk against the source without moving the data. Pure except `groupHashes`, which
// reads through an NBD client.
import crypto from 'node:crypto';
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
 * content.
 */
export async function groupHashes(nbd: NbdClient, size: number, groups: number[], knownZero: Range[], chunk = CHUNK, group = GROUP): Promise<Buffer[]> {
  const out: Buffer[] = [];
  const zero = mergeRanges(knownZero);
  const DEPTH = 16;
  for (const g of groups) {
    const pieces: Range[] = [];
    for (let c = 0; c < group; c++) {
      const off = (g * group + c) * chunk;
      if (off >= size) break;
      pieces.push({ offset: off, length: Math.min(chunk, size - off) });
    }
    const hashes: Buffer[] = [];
    for (let i = 0; i < pieces.length; i += DEPTH) {
      const batch = pieces.slice(i, i + DEPTH);
      const datas = await Promise.all(batch.map((p) => (covered(zero, p.offset, p.length) ? null : nbd.read(p.offset, p.length))));
      datas.forEach((d, k) => hashes.push(d ? crypto.createHash('sha256').update(d).digest() : zeroHash(batch[k]!.length)));
    }
    out.push(crypto.createHash('sha256').update(Buffer.concat(hashes)).digest());
  }
  return out;
}

export const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest();
