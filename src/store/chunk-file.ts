// Why this file exists: what one chunk looks like on disk, and the only code that seals and
// opens it. A chunk is up to 64 KiB of a disk, named by its id: SHA-256 of the plain bytes, or,
// in an encrypted store, HMAC-SHA256 under a key derived from the store key (so names leak no
// content). Every read recomputes the id from the bytes it returns: a flipped bit anywhere is
// caught, never handed on.
//
// File layout (big endian)
//   0 "FRYC"  4 u8 version (1)  5 u8 flags (bit0 zstd, bit1 AES-256-GCM)  6..7 reserved (0)
//   8 u32 plain length
//   12 payload; when encrypted: 12-byte IV, 16-byte GCM tag, then the ciphertext
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { FerryError } from '../errors.js';

const require = createRequire(import.meta.url);
const zstd = (() => {
  try {
    return require('zstd-napi') as { compress(b: Buffer, o?: { compressionLevel?: number }): Buffer; decompress(b: Buffer): Buffer };
  } catch {
    return undefined;
  }
})();

const MAGIC = Buffer.from('FRYC');
const VERSION = 1;
const F_ZSTD = 1;
const F_AES = 2;
const HEAD = 12;

/** The store's key material, derived from the 32-byte key file. */
export interface StoreKey {
  enc: Buffer;
  mac: Buffer;
  /** HMAC of a fixed label: lets `open` tell a wrong key from a damaged chunk */
  check: string;
}

export function deriveKey(raw: Buffer): StoreKey {
  if (raw.length !== 32) throw new FerryError('STORE_WRONG_KEY', `a store key is 32 bytes; this one is ${raw.length}`);
  const h = (label: string) => crypto.createHmac('sha256', raw).update(label).digest();
  return { enc: h('ferry-store-enc'), mac: h('ferry-store-id'), check: h('ferry-store-check').toString('hex') };
}

/** The chunk's name. */
export function chunkId(plain: Buffer, key?: StoreKey): Buffer {
  return key ? crypto.createHmac('sha256', key.mac).update(plain).digest() : crypto.createHash('sha256').update(plain).digest();
}

export function seal(plain: Buffer, key: StoreKey | undefined, level = 1): Buffer {
  let flags = 0;
  let body = plain;
  if (zstd) {
    const c = zstd.compress(plain, { compressionLevel: level });
    if (c.length < plain.length * 0.97) {
      body = c;
      flags |= F_ZSTD;
    }
  }
  const head = Buffer.alloc(HEAD);
  MAGIC.copy(head, 0);
  head.writeUInt8(VERSION, 4);
  head.writeUInt32BE(plain.length, 8);
  if (key) {
    flags |= F_AES;
    head.writeUInt8(flags, 5);
    const iv = crypto.randomBytes(12);
    const c = crypto.createCipheriv('aes-256-gcm', key.enc, iv);
    c.setAAD(head);
    const ct = Buffer.concat([c.update(body), c.final()]);
    return Buffer.concat([head, iv, c.getAuthTag(), ct]);
  }
  head.writeUInt8(flags, 5);
  return Buffer.concat([head, body]);
}

/** Opens a chunk file's bytes and checks them against `id`; throws STORE_CORRUPT on any damage. */
export function open(file: Buffer, id: Buffer, key: StoreKey | undefined): Buffer {
  const bad = (why: string) => new FerryError('STORE_CORRUPT', `chunk ${id.toString('hex')}: ${why}`);
  if (file.length < HEAD || file.compare(MAGIC, 0, 4, 0, 4) !== 0) throw bad('not a chunk file');
  if (file.readUInt8(4) !== VERSION) throw bad(`unknown chunk version ${file.readUInt8(4)}`);
  const flags = file.readUInt8(5);
  const len = file.readUInt32BE(8);
  let body = file.subarray(HEAD);
  if (flags & F_AES) {
    if (!key) throw new FerryError('STORE_WRONG_KEY', 'the store holds encrypted chunks: give its key file (--key-file)');
    if (body.length < 28) throw bad('truncated');
    const d = crypto.createDecipheriv('aes-256-gcm', key.enc, body.subarray(0, 12));
    d.setAAD(file.subarray(0, HEAD));
    d.setAuthTag(body.subarray(12, 28));
    try {
      body = Buffer.concat([d.update(body.subarray(28)), d.final()]);
    } catch {
      throw bad('authentication failed (damaged, or a different key)');
    }
  }
  if (flags & F_ZSTD) {
    if (!zstd) throw bad('zstd-compressed, but zstd-napi is not available here');
    try {
      body = zstd.decompress(body);
    } catch {
      throw bad('zstd data is damaged');
    }
  }
  if (body.length !== len) throw bad(`length ${body.length}, header says ${len}`);
  if (!chunkId(body, key).equals(id)) throw bad('content does not match its name');
  return body;
}

/** Where chunk `idHex` lives in store directory `dir`. */
export function chunkPath(dir: string, idHex: string): string {
  return path.join(dir, 'chunks', idHex.slice(0, 2), idHex);
}

/**
 * Writes a chunk file under a temporary name and renames it into place, so a chunk file is
 * always whole. STORE_FULL when the file system is full.
 */
export function writeChunkFile(dir: string, idHex: string, sealed: Buffer): void {
  const f = chunkPath(dir, idHex);
  const tmp = `${f}.tmp`;
  try {
    fs.writeFileSync(tmp, sealed);
    fs.renameSync(tmp, f);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') throw new FerryError('STORE_FULL', `the store's file system is full (${dir}); nothing was committed, earlier backups are intact`, { cause: e });
    throw e;
  }
}

/**
 * Names and seals the chunks of a run of adjacent `chunk`-sized pieces of a disk (a Sealer
 * worker's job). An all-zero chunk is not stored (stored -1, id zeroes); a chunk `held` says the
 * store has, or one this run already sealed, is not compressed again (stored 0). The sealed
 * chunks are returned back to back in `sealed`, in chunk order.
 */
export function sealRun(key: StoreKey | undefined, chunk: number, run: Buffer, held: (id: Buffer) => boolean): { ids: Buffer; stored: Int32Array; sealed: Buffer } {
  const count = Math.ceil(run.length / chunk);
  const ids = Buffer.alloc(count * 32);
  const stored = new Int32Array(count);
  const out: Buffer[] = [];
  const mine = new Set<string>();
  for (let i = 0; i < count; i++) {
    const plain = run.subarray(i * chunk, Math.min(run.length, (i + 1) * chunk));
    if (isZero(plain)) {
      stored[i] = -1;
      continue;
    }
    const id = chunkId(plain, key);
    id.copy(ids, i * 32);
    const hex = id.toString('hex');
    if (mine.has(hex) || held(id)) continue;
    mine.add(hex);
    const sealed = seal(plain, key);
    out.push(sealed);
    stored[i] = sealed.length;
  }
  return { ids, stored, sealed: Buffer.concat(out) };
}

const ZEROS = Buffer.alloc(64 * 1024);
function isZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - at);
    if (b.compare(ZEROS, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}
