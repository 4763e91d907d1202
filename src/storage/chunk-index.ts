// Why this file exists: "send only what the destination already holds". A host's read-only
// templates (the guest image's root disk) are indexed as 64 KiB chunks named by SHA-256; a
// migration destination advertises those names to the source's transport, which then sends a
// 32-byte reference instead of any disk block with the same content (a VM's data often repeats
// its template's: copied files, reinstalled packages). The index is built once per template and
// machine (a raw copy for O(1) reads by offset, and the hash list), cached in the images dir.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { run } from '../util/exec.js';

export const INDEX_CHUNK = 64 * 1024;

export interface ChunkIndex {
  template: string;
  chunks: number;
  hashes(): Buffer[];
  /** the chunk's content, or undefined when this index does not hold it */
  read(hash: Buffer): Buffer | undefined;
  /** releases what the index holds open (a store's database) */
  close?(): void;
}

const cache = new Map<string, Promise<ChunkIndex>>();

/** The chunk index of a template (built on first use, then loaded from its cache). */
export function templateIndex(template: string): Promise<ChunkIndex> {
  let p = cache.get(template);
  if (!p) {
    p = build(template);
    cache.set(template, p);
    p.catch(() => cache.delete(template));
  }
  return p;
}

async function build(template: string): Promise<ChunkIndex> {
  const st = fs.statSync(template);
  const dir = path.join(path.dirname(template), '.chunks');
  fs.mkdirSync(dir, { recursive: true });
  const base = path.join(dir, `${path.basename(template)}-${st.size}-${Math.round(st.mtimeMs)}`);
  const raw = `${base}.raw`;
  const idx = `${base}.idx`;
  if (!fs.existsSync(idx) || !fs.existsSync(raw)) {
    const tmp = `${base}.${process.pid}.tmp`;
    await run('qemu-img', ['convert', '-U', '-O', 'raw', template, `${tmp}.raw`]);
    const fd = fs.openSync(`${tmp}.raw`, 'r');
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.alloc(INDEX_CHUNK);
    const out: Buffer[] = [];
    for (let off = 0; off < size; off += INDEX_CHUNK) {
      const n = fs.readSync(fd, buf, 0, INDEX_CHUNK, off);
      if (n < INDEX_CHUNK || buf.every((b) => b === 0)) continue; // zeroes cross as lengths anyway
      const rec = Buffer.alloc(40);
      crypto.createHash('sha256').update(buf).digest().copy(rec, 0);
      rec.writeBigUInt64BE(BigInt(off), 32);
      out.push(rec);
    }
    fs.closeSync(fd);
    fs.writeFileSync(`${tmp}.idx`, Buffer.concat(out));
    fs.renameSync(`${tmp}.raw`, raw);
    fs.renameSync(`${tmp}.idx`, idx);
  }
  const recs = fs.readFileSync(idx);
  const byHash = new Map<string, number>();
  for (let i = 0; i + 40 <= recs.length; i += 40) byHash.set(recs.subarray(i, i + 32).toString('hex'), Number(recs.readBigUInt64BE(i + 32)));
  const fd = fs.openSync(raw, 'r');
  return {
    template,
    chunks: byHash.size,
    hashes: () => [...byHash.keys()].map((h) => Buffer.from(h, 'hex')),
    read: (hash) => {
      const off = byHash.get(hash.toString('hex'));
      if (off === undefined) return undefined;
      const b = Buffer.alloc(INDEX_CHUNK);
      fs.readSync(fd, b, 0, INDEX_CHUNK, off);
      return b;
    },
  };
}
