// Why this file exists: the content-addressed chunk store — the one owner of a store directory.
// Backups, restores, templates and migration seeding all read and write chunks through it.
//
// Layout of a store directory
//   ferry-store.json   format version, whether chunks are encrypted, the key check
//   index.db           SQLite (WAL, synchronous=FULL): chunks {id, sizes, refs}, backups, and
//                      each backed-up disk's manifest (one 32-byte chunk id per 64 KiB; zeroes
//                      for an all-zero chunk)
//   chunks/ab/<id>     one file per chunk (chunk-file.ts), named by its id
//   lock               the pid of the one writer (backup, prune, gc)
//
// Crash safety. A chunk file is written under a temporary name and renamed. A backup commits in
// one SQLite transaction (its manifests, its chunks' rows and reference counts) only after the
// file system was synced (syncfs), so the index never names a chunk that is not durable. kill -9
// at any point leaves the last committed state: files without a row (a backup that never
// committed) and temporary files are swept by `gc` and by the next writer after a stale lock.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { FerryError } from '../errors.js';
import { run } from '../util/exec.js';
import { chunkId, deriveKey, open as openChunk, seal, type StoreKey } from './chunk-file.js';
import { Sealer } from './sealer.js';

export const STORE_CHUNK = 64 * 1024;
export const ZERO_ID = Buffer.alloc(32);
const FORMAT = 1;

export interface StoreConfig {
  format: number;
  created: number;
  encrypted: boolean;
  keyCheck?: string;
}

export interface BackupRow {
  id: string;
  vm: string;
  created: number;
  kind: 'full' | 'incremental';
  parent: string | null;
  spec: string;
  /** bytes read from the VM, and bytes of new chunks (compressed) this backup added */
  bytesRead: number;
  bytesNew: number;
  durationMs: number;
}

export interface BackupDisk {
  disk: number;
  size: number;
  manifest: Buffer;
}

export function storeInit(dir: string, o: { keyFile?: string } = {}): StoreConfig {
  const cfgFile = path.join(dir, 'ferry-store.json');
  if (fs.existsSync(cfgFile)) throw new FerryError('STORE_EXISTS', `${dir} already holds a Ferry store`);
  fs.mkdirSync(path.join(dir, 'chunks'), { recursive: true });
  if (fs.readdirSync(dir).some((f) => f !== 'chunks')) throw new FerryError('INVALID_ARGUMENT', `${dir} is not empty`);
  let key: StoreKey | undefined;
  if (o.keyFile) {
    if (!fs.existsSync(o.keyFile)) fs.writeFileSync(o.keyFile, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600, flag: 'wx' });
    key = readKey(o.keyFile);
  }
  for (let i = 0; i < 256; i++) fs.mkdirSync(path.join(dir, 'chunks', i.toString(16).padStart(2, '0')), { recursive: true });
  const cfg: StoreConfig = { format: FORMAT, created: Date.now(), encrypted: !!key, ...(key ? { keyCheck: key.check } : {}) };
  const s = new ChunkStore(dir, cfg, key, false);
  s.close();
  writeDurable(cfgFile, JSON.stringify(cfg, null, 2) + '\n');
  return cfg;
}

function readKey(file: string): StoreKey {
  let txt: string;
  try {
    txt = fs.readFileSync(file, 'utf8').trim();
  } catch (e) {
    throw new FerryError('STORE_WRONG_KEY', `cannot read key file ${file}: ${(e as Error).message}`, { cause: e });
  }
  if (!/^[0-9a-f]{64}$/i.test(txt)) throw new FerryError('STORE_WRONG_KEY', `${file} is not a store key (64 hex digits)`);
  return deriveKey(Buffer.from(txt, 'hex'));
}

function writeDurable(file: string, data: string | Buffer): void {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  fs.writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}

/**
 * Opens a store. `write` takes the writer lock (STORE_LOCKED if a live process holds it) and,
 * when the last writer died holding it, sweeps what it left behind.
 */
export function openStore(dir: string, o: { keyFile?: string; write?: boolean } = {}): ChunkStore {
  const cfgFile = path.join(dir, 'ferry-store.json');
  let cfg: StoreConfig;
  try {
    cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8')) as StoreConfig;
  } catch {
    throw new FerryError('STORE_NOT_FOUND', `${dir} is not a Ferry store (no ferry-store.json): create one with \`ferry store init ${dir}\``);
  }
  if (cfg.format !== FORMAT) throw new FerryError('STORE_CORRUPT', `${dir}: store format ${cfg.format}, this Ferry reads ${FORMAT}`);
  let key: StoreKey | undefined;
  if (cfg.encrypted) {
    if (!o.keyFile) throw new FerryError('STORE_WRONG_KEY', `${dir} is encrypted: give its key file (--key-file)`);
    key = readKey(o.keyFile);
    if (key.check !== cfg.keyCheck) throw new FerryError('STORE_WRONG_KEY', `${o.keyFile} is not the key of ${dir}`);
  }
  return new ChunkStore(dir, cfg, key, !!o.write);
}

export class ChunkStore {
  private readonly db: Database.Database;
  /** ids (hex) the index holds, plus chunks written by the backup in progress (writers only) */
  private readonly known = new Set<string>();
  private pending = new Map<string, { stored: number; plain: number }>();
  private locked = false;

  constructor(readonly dir: string, readonly config: StoreConfig, private readonly key: StoreKey | undefined, write: boolean) {
    const stale = write && this.lock();
    this.db = new Database(path.join(dir, 'index.db'));
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = FULL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, stored INTEGER NOT NULL, plain INTEGER NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS backups (id TEXT PRIMARY KEY, vm TEXT NOT NULL, created INTEGER NOT NULL, kind TEXT NOT NULL, parent TEXT,
        spec TEXT NOT NULL, bytes_read INTEGER NOT NULL, bytes_new INTEGER NOT NULL, duration_ms INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS backup_disks (backup TEXT NOT NULL, disk INTEGER NOT NULL, size INTEGER NOT NULL, manifest BLOB NOT NULL, PRIMARY KEY (backup, disk));
    `);
    // Only a writer needs the set of held ids (to skip what the store has); readers (list, verify,
    // export, a migration's seed) do not pay for loading it.
    if (write) for (const r of this.db.prepare('SELECT id FROM chunks').raw().iterate()) this.known.add((r as [Buffer])[0].toString('hex'));
    if (stale) this.sweep();
  }

  get encrypted(): boolean {
    return !!this.key;
  }

  /** Takes the writer lock; true when a dead writer held it (what it left must be swept). */
  private lock(): boolean {
    const file = path.join(this.dir, 'lock');
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        fs.writeFileSync(file, String(process.pid), { flag: 'wx' });
        this.locked = true;
        return attempt > 0;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        const pid = Number(fs.readFileSync(file, 'utf8'));
        if (pid && pid !== process.pid && alive(pid)) throw new FerryError('STORE_LOCKED', `${this.dir} is in use by process ${pid} (a backup, prune or gc)`);
        fs.rmSync(file, { force: true }); // its writer died: take over, then sweep what it left
      }
    }
    throw new FerryError('STORE_LOCKED', `cannot take the lock of ${this.dir}`);
  }

  close(): void {
    this.db.close();
    if (this.locked) fs.rmSync(path.join(this.dir, 'lock'), { force: true });
    this.locked = false;
  }

  private file(idHex: string): string {
    return path.join(this.dir, 'chunks', idHex.slice(0, 2), idHex);
  }

  /** Stores a chunk unless the store holds it (sealed on this thread); returns its id and the bytes written. */
  put(plain: Buffer): { id: Buffer; written: number } {
    const id = chunkId(plain, this.key);
    if (this.known.has(id.toString('hex'))) return { id, written: 0 };
    return { id, written: this.putSealed(id, seal(plain, this.key), plain.length) };
  }

  /** Stores a chunk sealed elsewhere (a Sealer worker) unless the store holds it already. */
  putSealed(id: Buffer, sealed: Buffer, plainLength: number): number {
    this.mustWrite();
    const hex = id.toString('hex');
    if (this.known.has(hex)) return 0;
    this.writeChunk(hex, sealed);
    this.known.add(hex);
    this.pending.set(hex, { stored: sealed.length, plain: plainLength });
    return sealed.length;
  }

  /** A pool of worker threads that name and seal chunks for this store. */
  sealer(threads = Math.max(1, Math.min(4, os.availableParallelism() - 1))): Sealer {
    return new Sealer(this.key, threads);
  }

  private writeChunk(hex: string, data: Buffer): void {
    const f = this.file(hex);
    try {
      fs.writeFileSync(`${f}.tmp`, data);
      fs.renameSync(`${f}.tmp`, f);
    } catch (e) {
      fs.rmSync(`${f}.tmp`, { force: true });
      if ((e as NodeJS.ErrnoException).code === 'ENOSPC' || (e as NodeJS.ErrnoException).code === 'EDQUOT') {
        throw new FerryError('STORE_FULL', `the store's file system is full (${this.dir}); nothing was committed, earlier backups are intact`, { cause: e });
      }
      throw e;
    }
  }

  /** A chunk's plain bytes, checked against its id. */
  get(id: Buffer): Buffer {
    const hex = id.toString('hex');
    let file: Buffer;
    try {
      file = fs.readFileSync(this.file(hex));
    } catch (e) {
      throw new FerryError('STORE_CORRUPT', `chunk ${hex} is missing from ${this.dir}`, { cause: e });
    }
    return openChunk(file, id, this.key);
  }

  /** A chunk's plain bytes if the store holds it intact (seeding: a miss is not an error). */
  readIfPresent(id: Buffer): Buffer | undefined {
    try {
      return this.get(id);
    } catch {
      return undefined;
    }
  }

  /** Makes the written chunks durable, then records the backup and its references atomically. */
  async commit(b: BackupRow, disks: BackupDisk[]): Promise<void> {
    this.mustWrite();
    try {
      await run('sync', ['-f', path.join(this.dir, 'chunks')]);
    } catch (e) {
      throw new FerryError('STORE_FULL', `could not make the new chunks durable in ${this.dir}: ${(e as Error).message}`, { cause: e });
    }
    const refs = distinctIds(disks.map((d) => d.manifest));
    const insChunk = this.db.prepare('INSERT OR IGNORE INTO chunks (id, stored, plain, refs) VALUES (?, ?, ?, 0)');
    const ref = this.db.prepare('UPDATE chunks SET refs = refs + 1 WHERE id = ?');
    const tx = this.db.transaction(() => {
      for (const [hex, s] of this.pending) insChunk.run(Buffer.from(hex, 'hex'), s.stored, s.plain);
      this.db.prepare('INSERT INTO backups (id, vm, created, kind, parent, spec, bytes_read, bytes_new, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)').run(b.id, b.vm, b.created, b.kind, b.parent, b.spec, b.bytesRead, b.bytesNew, b.durationMs);
      const insDisk = this.db.prepare('INSERT INTO backup_disks (backup, disk, size, manifest) VALUES (?, ?, ?, ?)');
      for (const d of disks) insDisk.run(b.id, d.disk, d.size, d.manifest);
      for (const id of refs) {
        if (ref.run(id).changes !== 1) throw new FerryError('STORE_CORRUPT', `backup ${b.id} names chunk ${id.toString('hex')}, which the store does not hold`);
      }
    });
    try {
      tx();
    } catch (e) {
      if ((e as { code?: string }).code === 'SQLITE_FULL') throw new FerryError('STORE_FULL', `the store's index could not grow (${this.dir}); nothing was committed`, { cause: e });
      throw e;
    }
    this.pending.clear();
  }

  /** Forgets chunks written by a backup that will not commit (their files go now). */
  abandon(): void {
    for (const hex of this.pending.keys()) {
      this.known.delete(hex);
      fs.rmSync(this.file(hex), { force: true });
    }
    this.pending.clear();
  }

  backups(vm?: string): BackupRow[] {
    const rows = this.db.prepare(`SELECT id, vm, created, kind, parent, spec, bytes_read AS bytesRead, bytes_new AS bytesNew, duration_ms AS durationMs FROM backups ${vm ? 'WHERE vm = ?' : ''} ORDER BY created`).all(...(vm ? [vm] : [])) as BackupRow[];
    return rows;
  }

  /** A backup by id or unique id prefix. */
  backup(idOrPrefix: string): BackupRow {
    const rows = this.db.prepare(`SELECT id, vm, created, kind, parent, spec, bytes_read AS bytesRead, bytes_new AS bytesNew, duration_ms AS durationMs FROM backups WHERE id LIKE ? || '%'`).all(idOrPrefix) as BackupRow[];
    if (rows.length !== 1) throw new FerryError(rows.length ? 'INVALID_ARGUMENT' : 'BACKUP_NOT_FOUND', rows.length ? `backup id prefix "${idOrPrefix}" is ambiguous` : `no backup "${idOrPrefix}" in ${this.dir}`);
    return rows[0]!;
  }

  disks(backupId: string): BackupDisk[] {
    return this.db.prepare('SELECT disk, size, manifest FROM backup_disks WHERE backup = ? ORDER BY disk').all(backupId) as BackupDisk[];
  }

  /** Removes a backup and drops its references (gc frees the chunks no backup needs). */
  deleteBackup(id: string): void {
    this.mustWrite();
    const refs = distinctIds(this.disks(id).map((d) => d.manifest));
    const unref = this.db.prepare('UPDATE chunks SET refs = refs - 1 WHERE id = ?');
    this.db.transaction(() => {
      for (const r of refs) unref.run(r);
      this.db.prepare('DELETE FROM backup_disks WHERE backup = ?').run(id);
      this.db.prepare('DELETE FROM backups WHERE id = ?').run(id);
    })();
  }

  /** Deletes unreferenced chunks and whatever a dead writer left; returns what was freed. */
  gc(): { chunks: number; bytes: number; orphans: number } {
    this.mustWrite();
    const dead = this.db.prepare('SELECT id, stored FROM chunks WHERE refs <= 0').all() as { id: Buffer; stored: number }[];
    this.db.transaction(() => {
      const del = this.db.prepare('DELETE FROM chunks WHERE id = ?');
      for (const d of dead) del.run(d.id);
    })();
    let bytes = 0;
    for (const d of dead) {
      const hex = d.id.toString('hex');
      this.known.delete(hex);
      fs.rmSync(this.file(hex), { force: true });
      bytes += d.stored;
    }
    const sw = this.sweep();
    return { chunks: dead.length, bytes: bytes + sw.bytes, orphans: sw.files };
  }

  /** Removes temporary files and chunk files no index row names (a writer died before commit). */
  private sweep(): { files: number; bytes: number } {
    const rows = new Set<string>();
    for (const r of this.db.prepare('SELECT id FROM chunks').raw().iterate()) rows.add((r as [Buffer])[0].toString('hex'));
    let files = 0;
    let bytes = 0;
    const root = path.join(this.dir, 'chunks');
    for (const sub of fs.readdirSync(root)) {
      for (const f of fs.readdirSync(path.join(root, sub))) {
        if (rows.has(f) || this.pending.has(f)) continue;
        const p = path.join(root, sub, f);
        bytes += fs.statSync(p).size;
        fs.rmSync(p, { force: true });
        files++;
        this.known.delete(f.replace(/\.tmp$/, ''));
      }
    }
    return { files, bytes };
  }

  /** Reads every chunk (of one backup, or all) and checks it; returns the damaged ids and who needs them. */
  verify(backupId?: string, onProgress?: (done: number, total: number) => void): { checked: number; bad: { id: string; error: string; backups: string[] }[] } {
    const ids = backupId ? distinctIds(this.disks(backupId).map((d) => d.manifest)) : (this.db.prepare('SELECT id FROM chunks WHERE refs > 0').raw().all() as [Buffer][]).map((r) => r[0]);
    const bad: { id: string; error: string; backups: string[] }[] = [];
    ids.forEach((id, i) => {
      try {
        this.get(id);
      } catch (e) {
        bad.push({ id: id.toString('hex'), error: (e as Error).message, backups: [] });
      }
      if (onProgress && (i % 256 === 0 || i === ids.length - 1)) onProgress(i + 1, ids.length);
    });
    if (bad.length) {
      const byId = new Map(bad.map((b) => [b.id, b]));
      for (const r of this.db.prepare('SELECT backup, manifest FROM backup_disks').all() as { backup: string; manifest: Buffer }[]) {
        for (let i = 0; i < r.manifest.length; i += 32) {
          const b = byId.get(r.manifest.subarray(i, i + 32).toString('hex'));
          if (b && !b.backups.includes(r.backup)) b.backups.push(r.backup);
        }
      }
    }
    return { checked: ids.length, bad };
  }

  info(): { dir: string; encrypted: boolean; chunks: number; storedBytes: number; plainBytes: number; backups: number; vms: number; unreferenced: number } {
    const c = this.db.prepare('SELECT COUNT(*) AS n, COALESCE(SUM(stored),0) AS s, COALESCE(SUM(plain),0) AS p, COALESCE(SUM(refs <= 0),0) AS u FROM chunks').get() as { n: number; s: number; p: number; u: number };
    const b = this.db.prepare('SELECT COUNT(*) AS n, COUNT(DISTINCT vm) AS v FROM backups').get() as { n: number; v: number };
    return { dir: this.dir, encrypted: this.encrypted, chunks: c.n, storedBytes: c.s, plainBytes: c.p, backups: b.n, vms: b.v, unreferenced: c.u };
  }

  private mustWrite(): void {
    if (!this.locked) throw new Error('store opened read-only');
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The distinct non-zero chunk ids of manifests. */
export function distinctIds(manifests: Buffer[]): Buffer[] {
  const seen = new Set<string>();
  const out: Buffer[] = [];
  for (const m of manifests) {
    for (let i = 0; i < m.length; i += 32) {
      const id = m.subarray(i, i + 32);
      if (id.equals(ZERO_ID)) continue;
      const h = id.toString('hex');
      if (!seen.has(h)) {
        seen.add(h);
        out.push(Buffer.from(id));
      }
    }
  }
  return out;
}
