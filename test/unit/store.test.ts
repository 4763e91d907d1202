// The chunk store's edge cases without QEMU: sealing, checking, keys, the writer lock, commit
// atomicity, gc, and what a writer that died leaves behind. Backups of real VMs are in
// test/integration/backup.test.ts.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { selectKept } from '../../src/backup/prune.js';
import { deriveKey, open, seal, chunkId } from '../../src/store/chunk-file.js';
import { openStore, storeInit, STORE_CHUNK, ZERO_ID, type BackupRow } from '../../src/store/store.js';

const dirs: string[] = [];
const tmp = () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'fst-'));
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

const row = (id: string, vm = 'vm1', created = Date.now()): BackupRow => ({ id, vm, created, kind: 'full', parent: null, spec: '{}', bytesRead: 0, bytesNew: 0, durationMs: 0 });
const block = (seed: number) => crypto.createHash('sha256').update(String(seed)).digest().toString('hex').repeat(STORE_CHUNK / 64).slice(0, STORE_CHUNK);

describe('chunk files', () => {
  it('round-trip plain and encrypted; any flipped bit is caught', () => {
    const plain = Buffer.from(block(1));
    const key = deriveKey(crypto.randomBytes(32));
    for (const k of [undefined, key]) {
      const id = chunkId(plain, k);
      const f = seal(plain, k);
      expect(open(f, id, k).equals(plain)).toBe(true);
      const bad = Buffer.from(f);
      bad[bad.length - 5]! ^= 1;
      expect(() => open(bad, id, k)).toThrow(/STORE_CORRUPT|chunk/);
    }
    expect(chunkId(plain, key).equals(chunkId(plain))).toBe(false); // encrypted names leak nothing
  });
});

describe('chunk store', () => {
  it('runs through the sealer go to one pack: zero chunks are not stored, duplicates once, abandon removes the pack', async () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    const { sealer, release } = s.sealer(); // the compiled worker is absent under vitest: runs on this thread
    // four chunks: data, zeroes, the same data again, a short last chunk
    const run = Buffer.concat([Buffer.from(block(1)), Buffer.alloc(STORE_CHUNK), Buffer.from(block(1)), Buffer.from(block(2)).subarray(0, 1000)]);
    const r = await sealer.sealRun(Buffer.from(run));
    expect([...r.stored].map((x) => Math.sign(x))).toEqual([1, -1, 0, 1]);
    expect(r.ids.subarray(32, 64).equals(ZERO_ID)).toBe(true);
    expect(r.ids.subarray(0, 32).equals(r.ids.subarray(64, 96))).toBe(true);
    expect(s.adopt(r, run.length).chunks).toBe(2);
    expect(s.get(r.ids.subarray(96, 128)).length).toBe(1000); // readable before the commit
    expect(s.adopt(await sealer.sealRun(Buffer.from(run)), run.length)).toEqual({ chunks: 0, bytes: 0 });
    expect(fs.readdirSync(path.join(dir, 'packs'))).toHaveLength(1);
    s.abandon();
    expect(fs.readdirSync(path.join(dir, 'packs'))).toEqual([]);
    release();
    s.close();
  });

  it('packed chunks commit, verify, and gc compacts a mostly dead pack', async () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    const { sealer, release } = s.sealer();
    const manifest = async (seeds: number[]) => {
      const run = Buffer.concat(seeds.map((n) => Buffer.from(block(n))));
      const r = await sealer.sealRun(Buffer.from(run));
      s.adopt(r, run.length);
      return r.ids;
    };
    const m1 = await manifest([1, 2, 3, 4]);
    await s.commit(row('b1'), [{ disk: 0, size: 4 * STORE_CHUNK, manifest: m1 }]);
    const m2 = await manifest([1, 5, 6, 7]); // shares chunk 1 with b1
    await s.commit(row('b2'), [{ disk: 0, size: 4 * STORE_CHUNK, manifest: m2 }]);
    expect(s.info()).toMatchObject({ chunks: 7, backups: 2, unreferenced: 0 });
    expect(s.verify().bad).toEqual([]);
    s.deleteBackup('b1'); // chunks 2, 3, 4 die: b1's pack is three quarters dead
    expect(s.info().unreferenced).toBe(3);
    const g = s.gc();
    expect(g.chunks).toBe(3);
    expect(g.bytes).toBeGreaterThan(0);
    expect(s.info()).toMatchObject({ chunks: 4, unreferenced: 0 });
    expect(s.verify('b2')).toMatchObject({ checked: 4, bad: [] });
    expect(s.get(m2.subarray(0, 32)).toString()).toBe(block(1));
    release();
    s.close();
  });

  it('stores each distinct chunk once, commits atomically, and counts references', async () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    const a = s.put(Buffer.from(block(1)));
    const b = s.put(Buffer.from(block(1)));
    expect(a.written).toBeGreaterThan(0);
    expect(b.written).toBe(0);
    const m = Buffer.concat([a.id, ZERO_ID, a.id]);
    await s.commit(row('b1'), [{ disk: 0, size: 3 * STORE_CHUNK, manifest: m }]);
    expect(s.info()).toMatchObject({ chunks: 1, backups: 1, unreferenced: 0 });
    expect(s.get(a.id).toString()).toBe(block(1));
    s.deleteBackup('b1');
    expect(s.info().unreferenced).toBe(1);
    expect(s.gc().chunks).toBe(1);
    expect(s.info().chunks).toBe(0);
    s.close();
  });

  it('a writer killed before commit leaves the last committed state; the next writer sweeps its files', async () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    const a = s.put(Buffer.from(block(1)));
    await s.commit(row('b1'), [{ disk: 0, size: STORE_CHUNK, manifest: a.id }]);
    s.put(Buffer.from(block(2))); // never committed
    // Simulate kill -9: the process is gone, its lock file names a dead pid.
    fs.writeFileSync(path.join(dir, 'lock'), '999999');
    const s2 = openStore(dir, { write: true });
    expect(s2.info()).toMatchObject({ chunks: 1, backups: 1 });
    const files = fs.readdirSync(path.join(dir, 'chunks')).flatMap((d) => fs.readdirSync(path.join(dir, 'chunks', d)));
    expect(files).toEqual([a.id.toString('hex')]);
    expect(s2.verify().bad).toEqual([]);
    s2.close();
    s.close();
  });

  it('one writer at a time: a live holder gives STORE_LOCKED', () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    fs.writeFileSync(path.join(dir, 'lock'), String(process.ppid)); // a live process holds it
    expect(() => openStore(dir, { write: true })).toThrow(expect.objectContaining({ code: 'STORE_LOCKED' }));
    fs.writeFileSync(path.join(dir, 'lock'), String(process.pid));
    s.close();
  });

  it('an encrypted store refuses a missing or wrong key with STORE_WRONG_KEY', async () => {
    const d = tmp();
    const dir = path.join(d, 's');
    const key = path.join(d, 'key');
    storeInit(dir, { keyFile: key });
    expect(fs.statSync(key).mode & 0o777).toBe(0o600);
    const s = openStore(dir, { keyFile: key, write: true });
    const a = s.put(Buffer.from(block(3)));
    await s.commit(row('b1'), [{ disk: 0, size: STORE_CHUNK, manifest: a.id }]);
    s.close();
    expect(fs.readFileSync(path.join(dir, 'chunks', a.id.toString('hex').slice(0, 2), a.id.toString('hex'))).includes(Buffer.from(block(3).slice(0, 64)))).toBe(false);
    expect(() => openStore(dir)).toThrow(expect.objectContaining({ code: 'STORE_WRONG_KEY' }));
    const other = path.join(d, 'other');
    fs.writeFileSync(other, crypto.randomBytes(32).toString('hex'));
    expect(() => openStore(dir, { keyFile: other })).toThrow(expect.objectContaining({ code: 'STORE_WRONG_KEY' }));
    expect(openStore(dir, { keyFile: key }).get(a.id).toString()).toBe(block(3));
  });

  it('verify names a damaged chunk and the backups that need it', async () => {
    const dir = path.join(tmp(), 's');
    storeInit(dir);
    const s = openStore(dir, { write: true });
    const a = s.put(Buffer.from(block(1)));
    const b = s.put(Buffer.from(block(2)));
    await s.commit(row('b1'), [{ disk: 0, size: 2 * STORE_CHUNK, manifest: Buffer.concat([a.id, b.id]) }]);
    const f = path.join(dir, 'chunks', b.id.toString('hex').slice(0, 2), b.id.toString('hex'));
    const bytes = fs.readFileSync(f);
    bytes[bytes.length - 1]! ^= 0xff;
    fs.writeFileSync(f, bytes);
    const r = s.verify();
    expect(r.checked).toBe(2);
    expect(r.bad).toEqual([expect.objectContaining({ id: b.id.toString('hex'), backups: ['b1'] })]);
    s.close();
  });

  it('refuses to open a directory that is not a store, and to init over one', () => {
    const d = tmp();
    expect(() => openStore(d)).toThrow(expect.objectContaining({ code: 'STORE_NOT_FOUND' }));
    storeInit(path.join(d, 's'));
    expect(() => storeInit(path.join(d, 's'))).toThrow(expect.objectContaining({ code: 'STORE_EXISTS' }));
  });
});

describe('prune', () => {
  const day = 86_400_000;
  const t = Date.UTC(2026, 10, 20, 12);
  const bs = [0, 1, 2, 3].flatMap((d) => [{ id: `d${d}a`, created: t + d * day }, { id: `d${d}b`, created: t + d * day + 3600_000 }]);
  it('keep-last keeps the newest N', () => {
    expect(selectKept(bs, { keepLast: 3 }).keep.map((b) => b.id)).toEqual(['d3b', 'd3a', 'd2b']);
  });
  it('keep-daily keeps the newest of each of the last N days; the newest is always kept', () => {
    expect(selectKept(bs, { keepDaily: 2 }).keep.map((b) => b.id)).toEqual(['d3b', 'd2b']);
    expect(selectKept(bs, { keepLast: 0 }).keep.map((b) => b.id)).toEqual(['d3b']);
  });
});
