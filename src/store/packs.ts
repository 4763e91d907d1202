// Why this file exists: where a backup's new chunks go. Creating a file per 64 KiB chunk cost
// more than naming and compressing it (ext4 here: ~0.1 ms of journaled inode work each, 9 000
// files for a 1 GiB full backup), so a backup appends its new chunks, each in chunk-file.ts's
// format, to one pack file of its own: `packs/<random>.pack`. The index names a packed chunk by
// (pack, offset, stored length). A pack is only ever appended to by the backup that made it;
// it becomes durable with the backup's commit (syncfs) and is deleted whole when that backup
// does not commit, or when gc has moved its live chunks out (compaction).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { FerryError } from '../errors.js';

export const PACK_DIR = 'packs';

/** Appends to one new pack file. */
export class PackWriter {
  readonly name = `${crypto.randomBytes(8).toString('hex')}.pack`;
  private fd: number | undefined;
  /** bytes appended */
  size = 0;

  constructor(private readonly dir: string) {}

  get file(): string {
    return path.join(this.dir, PACK_DIR, this.name);
  }

  /** Appends `data`; returns its offset. STORE_FULL when the file system is full. */
  append(data: Buffer): number {
    const at = this.size;
    try {
      if (this.fd === undefined) {
        // A store made before packs gets the directory now (durably: its entry in the store).
        if (fs.mkdirSync(path.dirname(this.file), { recursive: true })) syncDir(this.dir);
        this.fd = fs.openSync(this.file, 'wx');
      }
      let done = 0;
      while (done < data.length) done += fs.writeSync(this.fd, data, done, data.length - done, at + done);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOSPC' || code === 'EDQUOT') throw new FerryError('STORE_FULL', `the store's file system is full (${this.dir}); nothing was committed, earlier backups are intact`, { cause: e });
      throw e;
    }
    this.size += data.length;
    return at;
  }

  /** Makes the pack and its directory entry durable. */
  sync(): void {
    if (this.fd === undefined) return;
    fs.fsyncSync(this.fd);
    syncDir(path.dirname(this.file));
  }

  /** sync() without blocking the event loop (a backup's commit: the agent keeps serving). */
  async syncAsync(): Promise<void> {
    if (this.fd === undefined) return;
    await promisify(fs.fsync)(this.fd);
    syncDir(path.dirname(this.file));
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }

  /** Closes and deletes the pack (its backup did not commit). */
  discard(): void {
    this.close();
    fs.rmSync(this.file, { force: true });
  }
}

/** Reads chunks out of packs, keeping a few file descriptors open. */
export class PackReader {
  private readonly fds = new Map<string, number>();

  constructor(private readonly dir: string) {}

  read(pack: string, offset: number, length: number): Buffer {
    let fd = this.fds.get(pack);
    if (fd === undefined) {
      if (this.fds.size >= 64) this.close();
      fd = fs.openSync(path.join(this.dir, PACK_DIR, pack), 'r');
      this.fds.set(pack, fd);
    }
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, out, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return done === length ? out : out.subarray(0, done);
  }

  /** Forgets the descriptor of a pack about to be deleted. */
  forget(pack: string): void {
    const fd = this.fds.get(pack);
    if (fd !== undefined) fs.closeSync(fd);
    this.fds.delete(pack);
  }

  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }
}

function syncDir(dir: string): void {
  const d = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(d);
  } finally {
    fs.closeSync(d);
  }
}
