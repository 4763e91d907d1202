// Why this file exists: a VM's snapshot tree moves with it. Snapshots are external (agent/
// snapshots.ts): each one is a set of read-only qcow2 images (one per disk) the VM's current
// overlays read through, and optionally a memory-state file. None of them changes while the
// migration holds the VM's lock, so they cross as plain files before the live part, and only the
// current overlays are copied live — the top layer only, since the destination then holds the
// same chain beneath them (disk-source.ts round 0, `base: 'template'`). Whole-disk verification at
// the switchover reads through the chain, so it checks the copied images too.
//
// On the wire (channel FILE): per file, one JSON message {name, size, from?}, then its bytes from
// `from` (default 0) as messages of ≤ 64 KiB (bare, so the transport's zero elision and dedup
// against the destination's template chunks see them). Control: `files` {files} → `files-want`
// {names, partial?} (what the destination lacks: a previous attempt's whole files stay in its
// migration cache, and a file it cut short stays as `name.part`, offered as a prefix the source
// resumes after when its own first bytes hash the same), then `files-done` → `files-ok` once
// every file arrived with its SHA-256. The destination rewrites each image's backing path to its
// own directory (`qemu-img rebase -u`) and records the tree in its database with the VM.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.js';
import type { SnapshotRow } from '../state/db.js';
import * as qcow2 from '../storage/qcow2.js';
import type { Session } from '../transport/session.js';
import { CH, type FilePrefix } from './protocol.js';

/** What an image reads through: another file of the chain, a template (same path on both hosts), or nothing. */
export type ChainBacking = { kind: 'file'; name: string } | { kind: 'template'; path: string } | { kind: 'none' };

export interface ChainFile {
  /** base name inside the VM's directory */
  name: string;
  size: number;
  sha256: string;
  /** images have a backing (possibly none); memory-state files do not */
  image: boolean;
  backing?: ChainBacking;
}

export interface ChainManifest {
  current: string | null;
  snapshots: { name: string; parent: string | null; createdAt: number; wasRunning: boolean; files: string[]; stateFile: string | null }[];
  files: ChainFile[];
  /** per disk: what the VM's current overlay reads through */
  tops: ChainBacking[];
}

const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/;
const PIECE = 64 * 1024;

async function backingOf(file: string, dir: string): Promise<ChainBacking> {
  const b = (await qcow2.info(file)).backingFile;
  if (!b) return { kind: 'none' };
  const abs = path.isAbsolute(b) ? b : path.join(path.dirname(file), b);
  return path.dirname(abs) === dir ? { kind: 'file', name: path.basename(abs) } : { kind: 'template', path: abs };
}

/** SHA-256 of a file's first `bytes` (all of it by default), not yet digested (it may go on). */
function hashFile(file: string, bytes?: number): Promise<crypto.Hash> {
  return new Promise((resolve, reject) => {
    const h = crypto.createHash('sha256');
    if (bytes === 0) return resolve(h);
    fs.createReadStream(file, bytes === undefined ? {} : { start: 0, end: bytes - 1 })
      .on('data', (d) => h.update(d))
      .on('error', reject)
      .on('end', () => resolve(h));
  });
}

const sha256File = async (file: string, bytes?: number) => (await hashFile(file, bytes)).digest('hex');

/** Source: the manifest of a VM's snapshot tree (undefined when it has none). */
export async function buildManifest(dir: string, rows: SnapshotRow[], current: string | null, topFiles: string[]): Promise<ChainManifest | undefined> {
  const ready = rows.filter((r) => r.status === 'ready');
  if (!ready.length) return undefined;
  const inDir = (f: string) => {
    if (path.dirname(f) !== dir || !FILE_NAME.test(path.basename(f))) throw new FerryError('MIGRATION_REFUSED', `snapshot file ${f} is not in the VM's directory ${dir}`);
    return path.basename(f);
  };
  const files: ChainFile[] = [];
  for (const r of ready) {
    for (const f of r.files) files.push({ name: inDir(f), size: fs.statSync(f).size, sha256: await sha256File(f), image: true, backing: await backingOf(f, dir) });
    if (r.stateFile) files.push({ name: inDir(r.stateFile), size: fs.statSync(r.stateFile).size, sha256: await sha256File(r.stateFile), image: false });
  }
  return {
    current,
    snapshots: ready.map((r) => ({ name: r.name, parent: r.parent, createdAt: r.createdAt, wasRunning: r.wasRunning, files: r.files.map((f) => path.basename(f)), stateFile: r.stateFile ? path.basename(r.stateFile) : null })),
    files,
    tops: await Promise.all(topFiles.map((f) => backingOf(f, dir))),
  };
}

/** Destination, at Begin: what this host lacks to hold the chain (templates it reads through). */
export function chainProblems(m: ChainManifest): string[] {
  const out: string[] = [];
  const names = new Set(m.files.map((f) => f.name));
  for (const f of m.files) if (!FILE_NAME.test(f.name)) out.push(`snapshot file name "${f.name}" is not valid`);
  for (const b of [...m.files.map((f) => f.backing), ...m.tops]) {
    if (b?.kind === 'template' && !fs.existsSync(b.path)) out.push(`this host lacks ${b.path}, which the VM's snapshot chain reads through`);
    if (b?.kind === 'file' && !names.has(b.name)) out.push(`the snapshot chain names ${b.name} but does not send it`);
  }
  return [...new Set(out)];
}

/** A file to send, from byte `from` (the end of the prefix the destination holds; 0: all of it). */
export interface FileSend {
  file: ChainFile;
  from: number;
}

/**
 * Source: what to send of the files the destination wants — a file it holds the first bytes of
 * (a previous attempt cut it short) goes on from there if those bytes hash the same here.
 */
export async function planFiles(dir: string, files: ChainFile[], partial: FilePrefix[] = []): Promise<FileSend[]> {
  const held = new Map(partial.map((p) => [p.name, p]));
  const out: FileSend[] = [];
  for (const f of files) {
    const p = held.get(f.name);
    const ok = p !== undefined && Number.isSafeInteger(p.bytes) && p.bytes > 0 && p.bytes < f.size && (await sha256File(path.join(dir, f.name), p.bytes)) === p.sha256;
    out.push({ file: f, from: ok ? p.bytes : 0 });
  }
  return out;
}

/** Source: sends the planned files of `dir` on the FILE channel; `progress` gets bytes sent. */
export async function sendFiles(session: Session, dir: string, plan: FileSend[], progress: (bytes: number) => void): Promise<void> {
  for (const { file: f, from } of plan) {
    await session.send(CH.FILE, Buffer.from(JSON.stringify({ name: f.name, size: f.size, ...(from ? { from } : {}) })));
    const fd = fs.openSync(path.join(dir, f.name), 'r');
    try {
      for (let off = from; off < f.size; off += PIECE) {
        const b = Buffer.alloc(Math.min(PIECE, f.size - off));
        fs.readSync(fd, b, 0, b.length, off);
        await session.send(CH.FILE, b);
        progress(b.length);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

/**
 * Destination: writes the FILE channel's files into `dir` (`name.part`, renamed when whole; a
 * `.part` a migration cut short stays, and the next attempt resumes it).
 */
export class FileReceiver {
  private cur: { name: string; size: number; got: number; fd: number; hash: crypto.Hash } | undefined;
  private readonly done = new Map<string, { size: number; sha256: string }>();
  /** the `.part` prefixes offered by `have`, their hash ready to go on */
  private readonly prefixes = new Map<string, { bytes: number; hash: crypto.Hash }>();
  private waiters: (() => void)[] = [];
  error: Error | undefined;

  constructor(private readonly dir: string) {}

  /**
   * What `dir` holds of the files (a previous attempt's): those whole with the manifest's size
   * and SHA-256, and the prefixes of those it cut short.
   */
  async have(files: ChainFile[]): Promise<{ whole: string[]; partial: FilePrefix[] }> {
    const whole: string[] = [];
    const partial: FilePrefix[] = [];
    for (const f of files) {
      const p = path.join(this.dir, f.name);
      if (fs.existsSync(p) && fs.statSync(p).size === f.size && (await sha256File(p)) === f.sha256) {
        this.done.set(f.name, { size: f.size, sha256: f.sha256 });
        whole.push(f.name);
        continue;
      }
      const part = `${p}.part`;
      const bytes = fs.existsSync(part) ? fs.statSync(part).size : 0;
      if (bytes > 0 && bytes < f.size) {
        const hash = await hashFile(part, bytes);
        this.prefixes.set(f.name, { bytes, hash });
        partial.push({ name: f.name, bytes, sha256: hash.copy().digest('hex') });
      }
    }
    return { whole, partial };
  }

  message(b: Buffer): void {
    if (this.error) return;
    try {
      if (!this.cur) {
        const h = JSON.parse(b.toString()) as { name?: unknown; size?: unknown; from?: unknown };
        const from = h.from ?? 0;
        if (typeof h.name !== 'string' || !FILE_NAME.test(h.name) || typeof h.size !== 'number' || !Number.isSafeInteger(h.size) || h.size < 0 || typeof from !== 'number' || !Number.isSafeInteger(from) || from < 0 || from > h.size) throw new FerryError('TRANSPORT_PROTOCOL', 'migration: malformed file header');
        fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
        const part = path.join(this.dir, `${h.name}.part`);
        const pre = this.prefixes.get(h.name);
        this.prefixes.delete(h.name);
        if (from > 0) {
          // Resumed: on after the prefix `have` offered (and hashed), whatever the file grew since.
          if (!pre || pre.bytes !== from) throw new FerryError('TRANSPORT_PROTOCOL', `migration: file ${h.name} resumes at byte ${from}, which this host did not offer`);
          const fd = fs.openSync(part, 'r+');
          fs.ftruncateSync(fd, from);
          this.cur = { name: h.name, size: h.size, got: from, fd, hash: pre.hash };
        } else this.cur = { name: h.name, size: h.size, got: 0, fd: fs.openSync(part, 'w'), hash: crypto.createHash('sha256') };
      } else {
        const c = this.cur;
        if (c.got + b.length > c.size) throw new FerryError('TRANSPORT_PROTOCOL', `migration: file ${c.name} longer than announced`);
        fs.writeSync(c.fd, b, 0, b.length, c.got);
        c.hash.update(b);
        c.got += b.length;
      }
      const c = this.cur;
      if (c.got === c.size) {
        fs.fsyncSync(c.fd);
        fs.closeSync(c.fd);
        fs.renameSync(path.join(this.dir, `${c.name}.part`), path.join(this.dir, c.name));
        this.done.set(c.name, { size: c.size, sha256: c.hash.digest('hex') });
        this.cur = undefined;
      }
    } catch (e) {
      this.error = e as Error; // ENOSPC and the like: `complete` reports it
    }
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves once every listed file is whole and matches its SHA-256; rejects on a mismatch. */
  async complete(files: ChainFile[]): Promise<void> {
    for (;;) {
      if (this.error) throw new FerryError('MIGRATION_FAILED', `receiving snapshot files failed: ${this.error.message}`, { cause: this.error });
      const missing = files.filter((f) => !this.done.has(f.name));
      if (!missing.length) break;
      await new Promise<void>((r) => this.waiters.push(r));
    }
    for (const f of files) {
      const d = this.done.get(f.name)!;
      if (d.size !== f.size || d.sha256 !== f.sha256) throw new FerryError('VERIFY_FAILED', `snapshot file ${f.name} arrived different from the source's (sha256 ${d.sha256.slice(0, 16)}…, want ${f.sha256.slice(0, 16)}…)`);
    }
  }

  /** Stops receiving: whole files stay (a retry's cache), and so does one cut short (resumed). */
  close(): void {
    if (this.cur) {
      fs.closeSync(this.cur.fd);
      if (this.cur.got === 0) fs.rmSync(path.join(this.dir, `${this.cur.name}.part`), { force: true });
    }
    this.cur = undefined;
    this.error ??= new Error('closed');
    for (const w of this.waiters.splice(0)) w();
  }
}

/** The path an image's backing resolves to on this host, with the chain's files in `dir`. */
export function backingPath(b: ChainBacking | undefined, dir: string): string | undefined {
  if (!b || b.kind === 'none') return undefined;
  return b.kind === 'file' ? path.join(dir, b.name) : b.path;
}

/**
 * Destination, creating the VM: moves the chain's files from `from` (the migration cache) into
 * `dir`, points every image at its backing here, and returns the snapshot rows to record.
 */
export async function installChain(m: ChainManifest, from: string, dir: string, vm: string, prevSpec: SnapshotRow['prevSpec']): Promise<SnapshotRow[]> {
  for (const f of m.files) fs.renameSync(path.join(from, f.name), path.join(dir, f.name));
  for (const f of m.files) if (f.image) await qcow2.rebaseUnsafe(path.join(dir, f.name), backingPath(f.backing, dir));
  return m.snapshots.map((s) => ({ vm, name: s.name, parent: s.parent, createdAt: s.createdAt, status: 'ready' as const, files: s.files.map((f) => path.join(dir, f)), stateFile: s.stateFile ? path.join(dir, s.stateFile) : null, wasRunning: s.wasRunning, prevSpec }));
}
