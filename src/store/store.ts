// Why this file exists: the content-addressed chunk store — the one owner of a store directory.
// Backups, restores, templates and migration seeding all read and write chunks through it.
//
// Layout of a store directory
//   ferry-store.json   format version, whether chunks are encrypted, the key check
//   index.db           SQLite (WAL, synchronous=FULL): chunks {id, sizes}, backups, and each
//                      backed-up disk's manifest (one 32-byte chunk id per 64 KiB; zeroes for
//                      an all-zero chunk). Which chunks are live is what the manifests name:
//                      gc marks from them (as PBS does), so a backup's commit costs only its new
//                      chunks, not an update per chunk it references. (The `refs` column of
//                      stores made before that is kept and ignored.)
//   packs/<r>.pack     the chunks a backup added, back to back (packs.ts); the index gives
//                      each packed chunk's (pack, offset, stored length)
//   chunks/ab/<id>     a chunk as a file of its own (chunk-file.ts), named by its id: put(),
//                      and every chunk of stores written before packs
//   lock               the pid of the one writer (backup, prune, gc)
//
// Crash safety. A chunk file is written under a temporary name and renamed; a pack is appended
// to only by the one backup that made it. A backup commits in
// one SQLite transaction (its manifests and its new chunks' rows) only after the
// file system was synced (syncfs), so the index never names a chunk that is not durable. kill -9
// at any point leaves the last committed state: files and packs no row names (a backup that
// never committed) and temporary files are swept by `gc` and by the next writer after a stale
// lock.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { FerryError } from '../errors.js';
import { run } from '../util/exec.js';
import { chunkId, chunkPath, deriveKey, open as openChunk, seal, writeChunkFile, type StoreKey } from './chunk-file.js';
import { PACK_DIR, PackReader, PackWriter } from './packs.js';
import { pooledSealer, type RunResult, type Sealer } from './sealer.js';

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
  fs.mkdirSync(path.join(dir, PACK_DIR));
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
  /** chunks written by the backup in progress: committed with it, removed by abandon */
  private pending = new Map<string, { stored: number; plain: number; off?: number }>();
  /** the pack of the backup in progress */
  private pack: PackWriter | undefined;
  private readonly packs: PackReader;
  private locked = false;
  private holdsQ: Database.Statement | undefined;
  private whereQ: Database.Statement | undefined;

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
    // Packed chunks (a store made before packs gains the columns; its chunks stay files).
    const cols = (this.db.prepare('PRAGMA table_info(chunks)').all() as { name: string }[]).map((c) => c.name);
    if (!cols.includes('pack')) this.db.exec('ALTER TABLE chunks ADD COLUMN pack TEXT; ALTER TABLE chunks ADD COLUMN off INTEGER;');
    this.packs = new PackReader(dir);
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
    this.packs.close();
    this.pack?.close();
    this.db.close();
    if (this.locked) fs.rmSync(path.join(this.dir, 'lock'), { force: true });
    this.locked = false;
  }

  private file(idHex: string): string {
    return chunkPath(this.dir, idHex);
  }

  /** Stores a chunk unless the store holds it (sealed on this thread); returns its id and the bytes written. */
  put(plain: Buffer): { id: Buffer; written: number } {
    const id = chunkId(plain, this.key);
    if (this.holds(id.toString('hex'))) return { id, written: 0 };
    return { id, written: this.putSealed(id, seal(plain, this.key), plain.length) };
  }

  /** Stores a sealed chunk unless the store holds it already; returns the bytes written. */
  private putSealed(id: Buffer, sealed: Buffer, plainLength: number): number {
    this.mustWrite();
    const hex = id.toString('hex');
    if (this.holds(hex)) return 0;
    writeChunkFile(this.dir, hex, sealed);
    this.pending.set(hex, { stored: sealed.length, plain: plainLength });
    return sealed.length;
  }

  /**
   * Worker threads that name, seal and write chunks into this store (adopt what they return),
   * kept warm between backups; release them when done.
   */
  sealer(threads = Math.max(2, Math.min(4, os.availableParallelism()))): { sealer: Sealer; release: () => void } {
    this.mustWrite();
    return pooledSealer(`${this.dir}#${this.config.created}`, this.dir, this.key, STORE_CHUNK, threads, (id) => this.holds(id.toString('hex')));
  }

  /**
   * Takes what a Sealer made of a run into the backup in progress: chunks the store does not
   * hold yet are appended to the backup's pack and become pending (committed with the backup,
   * removed by abandon). Returns the new chunks and their stored bytes.
   */
  adopt(r: RunResult, plainLength: number): { chunks: number; bytes: number } {
    this.mustWrite();
    const fresh: { hex: string; at: number; len: number; plain: number }[] = [];
    let at = 0;
    let sealedChunks = 0;
    for (let k = 0; k < r.stored.length; k++) {
      const len = r.stored[k]!;
      if (len <= 0) continue;
      sealedChunks++;
      const hex = r.ids.toString('hex', k * 32, k * 32 + 32);
      // The sealer left out what the index holds (it cannot change under the writer lock); two
      // workers may still seal one new chunk (their runs raced): it is stored once.
      if (!this.pending.has(hex) && !fresh.some((f) => f.hex === hex)) fresh.push({ hex, at, len, plain: Math.min(STORE_CHUNK, plainLength - k * STORE_CHUNK) });
      at += len;
    }
    if (!fresh.length) return { chunks: 0, bytes: 0 };
    this.pack ??= new PackWriter(this.dir);
    let bytes = 0;
    if (fresh.length === sealedChunks) {
      const base = this.pack.append(r.sealed);
      for (const f of fresh) this.pending.set(f.hex, { stored: f.len, plain: f.plain, off: base + f.at });
      bytes = r.sealed.length;
    } else {
      for (const f of fresh) {
        this.pending.set(f.hex, { stored: f.len, plain: f.plain, off: this.pack.append(r.sealed.subarray(f.at, f.at + f.len)) });
        bytes += f.len;
      }
    }
    return { chunks: fresh.length, bytes };
  }

  /** The index or the backup in progress holds chunk `hex`. */
  private holds(hex: string): boolean {
    this.holdsQ ??= this.db.prepare('SELECT 1 FROM chunks WHERE id = ?');
    return this.pending.has(hex) || this.holdsQ.get(Buffer.from(hex, 'hex')) !== undefined;
  }

  /** A chunk's plain bytes, checked against its id. */
  get(id: Buffer): Buffer {
    const hex = id.toString('hex');
    this.whereQ ??= this.db.prepare('SELECT stored, pack, off FROM chunks WHERE id = ?');
    const row = this.whereQ.get(id) as { stored: number; pack: string | null; off: number | null } | undefined;
    const p = this.pending.get(hex);
    const pack = row?.pack ?? (p?.off !== undefined ? this.pack?.name : undefined);
    let file: Buffer;
    try {
      if (pack) file = this.packs.read(pack, row?.off ?? p!.off!, row?.stored ?? p!.stored);
      else file = fs.readFileSync(this.file(hex));
    } catch (e) {
      throw new FerryError('STORE_CORRUPT', `chunk ${hex} is missing from ${this.dir}${pack ? ` (pack ${pack})` : ''}`, { cause: e });
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
  async commit(b: BackupRow, disks: BackupDisk[], onStep?: (what: string) => void): Promise<void> {
    this.mustWrite();
    try {
      // New chunks are in this backup's pack: syncing it is enough. Chunk files (put) need
      // their directories too: the whole file system is synced then.
      if ([...this.pending.values()].some((p) => p.off === undefined)) await run('sync', ['-f', path.join(this.dir, 'chunks')]);
      else await this.pack?.syncAsync();
    } catch (e) {
      throw new FerryError('STORE_FULL', `could not make the new chunks durable in ${this.dir}: ${(e as Error).message}`, { cause: e });
    }
    onStep?.('synced');
    // Every chunk the backup names must be in the store (held before, or written by it). Parts
    // of a manifest equal to the parent's were checked when the parent committed.
    const parent = b.parent ? this.disks(b.parent) : [];
    for (const d of disks) {
      const old = parent.find((p) => p.disk === d.disk && p.manifest.length === d.manifest.length)?.manifest;
      // Compared with the parent a block of 256 entries at a time: an incremental changes few.
      const BLOCK = 256 * 32;
      for (let blk = 0; blk < d.manifest.length; blk += BLOCK) {
        const end = Math.min(d.manifest.length, blk + BLOCK);
        if (old && d.manifest.compare(old, blk, end, blk, end) === 0) continue;
        for (let i = blk; i < end; i += 32) {
          if (old && d.manifest.compare(old, i, i + 32, i, i + 32) === 0) continue;
          if (d.manifest.compare(ZERO_ID, 0, 32, i, i + 32) === 0) continue;
          const hex = d.manifest.toString('hex', i, i + 32);
          if (!this.holds(hex)) throw new FerryError('STORE_CORRUPT', `backup ${b.id} names chunk ${hex}, which the store does not hold`);
        }
      }
    }
    const insChunk = this.db.prepare('INSERT OR IGNORE INTO chunks (id, stored, plain, refs, pack, off) VALUES (?, ?, ?, 0, ?, ?)');
    const pack = this.pack?.name ?? null;
    const tx = this.db.transaction(() => {
      for (const [hex, s] of this.pending) insChunk.run(Buffer.from(hex, 'hex'), s.stored, s.plain, s.off !== undefined ? pack : null, s.off ?? null);
      this.db.prepare('INSERT INTO backups (id, vm, created, kind, parent, spec, bytes_read, bytes_new, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)').run(b.id, b.vm, b.created, b.kind, b.parent, b.spec, b.bytesRead, b.bytesNew, b.durationMs);
      const insDisk = this.db.prepare('INSERT INTO backup_disks (backup, disk, size, manifest) VALUES (?, ?, ?, ?)');
      for (const d of disks) insDisk.run(b.id, d.disk, d.size, d.manifest);
    });
    onStep?.('checked');
    try {
      tx();
    } catch (e) {
      if ((e as { code?: string }).code === 'SQLITE_FULL') throw new FerryError('STORE_FULL', `the store's index could not grow (${this.dir}); nothing was committed`, { cause: e });
      throw e;
    }
    this.pending.clear();
    this.pack?.close();
    this.pack = undefined;
  }

  /** Forgets chunks written by a backup that will not commit (their files go now). */
  abandon(): void {
    for (const [hex, p] of this.pending) if (p.off === undefined) fs.rmSync(this.file(hex), { force: true });
    this.pending.clear();
    if (this.pack) this.packs.forget(this.pack.name);
    this.pack?.discard();
    this.pack = undefined;
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

  /** Removes a backup (gc frees the chunks no other backup names). */
  deleteBackup(id: string): void {
    this.mustWrite();
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM backup_disks WHERE backup = ?').run(id);
      this.db.prepare('DELETE FROM backups WHERE id = ?').run(id);
    })();
  }

  /** The ids (hex) some backup's manifest names: the live chunks. */
  private live(): Set<string> {
    const out = new Set<string>();
    for (const r of this.db.prepare('SELECT manifest FROM backup_disks').raw().iterate()) {
      const m = (r as [Buffer])[0];
      for (let i = 0; i < m.length; i += 32) if (m.compare(ZERO_ID, 0, 32, i, i + 32) !== 0) out.add(m.toString('hex', i, i + 32));
    }
    return out;
  }

  /** Chunks in the index that no backup names (what gc would free). */
  private dead(): { id: Buffer; stored: number; pack: string | null }[] {
    const live = this.live();
    return (this.db.prepare('SELECT id, stored, pack FROM chunks').all() as { id: Buffer; stored: number; pack: string | null }[]).filter((c) => !live.has(c.id.toString('hex')));
  }

  /**
   * Deletes chunks no backup names and whatever a dead writer left; packs that are more than
   * half dead are compacted (their live chunks moved to a new pack). Returns what was freed.
   */
  gc(): { chunks: number; bytes: number; orphans: number } {
    this.mustWrite();
    const dead = this.dead();
    this.db.transaction(() => {
      const del = this.db.prepare('DELETE FROM chunks WHERE id = ?');
      for (const d of dead) del.run(d.id);
    })();
    let bytes = 0;
    for (const d of dead) {
      if (d.pack) continue; // its pack shrinks below, or goes with the sweep
      fs.rmSync(this.file(d.id.toString('hex')), { force: true });
      bytes += d.stored;
    }
    bytes += this.compact();
    const sw = this.sweep();
    return { chunks: dead.length, bytes: bytes + sw.bytes, orphans: sw.files };
  }

  /** Moves the live chunks of mostly-dead packs into one new pack; returns the bytes freed. */
  private compact(): number {
    const live = this.db.prepare('SELECT pack, SUM(stored) AS bytes FROM chunks WHERE pack IS NOT NULL GROUP BY pack').all() as { pack: string; bytes: number }[];
    const victims = live.filter((p) => {
      const size = fs.statSync(path.join(this.dir, PACK_DIR, p.pack), { throwIfNoEntry: false })?.size ?? 0;
      return p.bytes < size / 2;
    });
    if (!victims.length) return 0;
    const out = new PackWriter(this.dir);
    const moves: { id: Buffer; off: number }[] = [];
    let before = 0;
    for (const v of victims) {
      before += fs.statSync(path.join(this.dir, PACK_DIR, v.pack)).size;
      for (const c of this.db.prepare('SELECT id, stored, off FROM chunks WHERE pack = ?').all(v.pack) as { id: Buffer; stored: number; off: number }[]) {
        moves.push({ id: c.id, off: out.append(this.packs.read(v.pack, c.off, c.stored)) });
      }
    }
    out.sync();
    const upd = this.db.prepare('UPDATE chunks SET pack = ?, off = ? WHERE id = ?');
    this.db.transaction(() => {
      for (const m of moves) upd.run(out.name, m.off, m.id);
    })();
    const after = out.size;
    out.close();
    for (const v of victims) {
      this.packs.forget(v.pack);
      fs.rmSync(path.join(this.dir, PACK_DIR, v.pack), { force: true });
    }
    return before - after;
  }

  /** Removes temporary files, chunk files and packs no index row names (a writer died before commit). */
  private sweep(): { files: number; bytes: number } {
    const rows = new Set<string>();
    for (const r of this.db.prepare('SELECT id FROM chunks WHERE pack IS NULL').raw().iterate()) rows.add((r as [Buffer])[0].toString('hex'));
    const packs = new Set((this.db.prepare('SELECT DISTINCT pack FROM chunks WHERE pack IS NOT NULL').raw().all() as [string][]).map((r) => r[0]));
    if (this.pack) packs.add(this.pack.name);
    let files = 0;
    let bytes = 0;
    const drop = (p: string) => {
      bytes += fs.statSync(p).size;
      fs.rmSync(p, { force: true });
      files++;
    };
    const root = path.join(this.dir, 'chunks');
    for (const sub of fs.readdirSync(root)) {
      for (const f of fs.readdirSync(path.join(root, sub))) if (!rows.has(f) && !this.pending.has(f)) drop(path.join(root, sub, f));
    }
    const packDir = path.join(this.dir, PACK_DIR);
    for (const f of fs.existsSync(packDir) ? fs.readdirSync(packDir) : []) if (!packs.has(f)) drop(path.join(packDir, f));
    return { files, bytes };
  }

  /** Reads every chunk (of one backup, or all) and checks it; returns the damaged ids and who needs them. */
  verify(backupId?: string, onProgress?: (done: number, total: number) => void): { checked: number; bad: { id: string; error: string; backups: string[] }[] } {
    const ids = backupId ? distinctIds(this.disks(backupId).map((d) => d.manifest)) : [...this.live()].map((h) => Buffer.from(h, 'hex'));
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
    const c = this.db.prepare('SELECT COUNT(*) AS n, COALESCE(SUM(stored),0) AS s, COALESCE(SUM(plain),0) AS p FROM chunks').get() as { n: number; s: number; p: number };
    const b = this.db.prepare('SELECT COUNT(*) AS n, COUNT(DISTINCT vm) AS v FROM backups').get() as { n: number; v: number };
    return { dir: this.dir, encrypted: this.encrypted, chunks: c.n, storedBytes: c.s, plainBytes: c.p, backups: b.n, vms: b.v, unreferenced: this.dead().length };
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
