// Why this file exists: the host's durable state — VM definitions, their runtime state (what
// QEMU pid runs them), and an append-only event log — in one embedded SQLite database in the
// agent's data dir. Only the agent opens it. WAL mode + synchronous=FULL: a state change the API
// reported survives a crash of the agent or the host.
import Database from 'better-sqlite3';
import type { VmRuntime, VmSpec } from '../vm/spec.js';

const SCHEMA_VERSION = 3;

export interface VmRecord {
  spec: VmSpec;
  runtime: VmRuntime;
  createdAt: number;
  updatedAt: number;
}

export interface EventRecord {
  id: number;
  ts: number;
  vm: string | null;
  kind: string;
  message: string;
}

export interface MigrationRow {
  id: string;
  role: 'source' | 'destination';
  vm: string;
  peer: string;
  phase: string;
  data: Record<string, unknown>;
  created_at?: number;
  updated_at?: number;
}

export interface SnapshotRow {
  vm: string;
  name: string;
  parent: string | null;
  createdAt: number;
  /** creating: journaled before QEMU switched to the overlays (recovery decides) */
  status: 'creating' | 'ready';
  files: string[];
  stateFile: string | null;
  wasRunning: boolean;
  /** the VM's definition before this snapshot (to undo a snapshot that did not take effect) */
  prevSpec: VmSpec;
}

export class StateDb {
  private readonly db: Database.Database;

  constructor(file: string) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = FULL');
    this.db.pragma('busy_timeout = 5000');
    this.migrate();
  }

  private migrate(): void {
    this.db.exec(`CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`);
    const row = this.db.prepare(`SELECT value FROM meta WHERE key = 'schema'`).get() as { value: string } | undefined;
    const v = row ? Number(row.value) : 0;
    if (v > SCHEMA_VERSION) throw new Error(`state database schema ${v} is newer than this Ferry (${SCHEMA_VERSION})`);
    if (v < 1) {
      this.db.exec(`
        CREATE TABLE vms (
          name TEXT PRIMARY KEY,
          uuid TEXT NOT NULL UNIQUE,
          spec TEXT NOT NULL,
          runtime TEXT NOT NULL,
          created_at INTEGER NOT NULL,
          updated_at INTEGER NOT NULL
        );
        CREATE TABLE events (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          ts INTEGER NOT NULL,
          vm TEXT,
          kind TEXT NOT NULL,
          message TEXT NOT NULL
        );
        CREATE INDEX events_vm ON events (vm, id);
        INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', '1');
      `);
    }
    if (v < 2) {
      // The migration journal (src/migration/journal.ts): one row per migration and role, its
      // phase written before the phase's side effects, so a restarted agent knows what to undo.
      this.db.exec(`
        CREATE TABLE migrations (
          id TEXT NOT NULL,
          role TEXT NOT NULL,
          vm TEXT NOT NULL,
          peer TEXT NOT NULL,
          phase TEXT NOT NULL,
          data TEXT NOT NULL,
          created_at INTEGER NOT NULL,
          updated_at INTEGER NOT NULL,
          PRIMARY KEY (id, role)
        );
        INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', '2');
      `);
    }
    if (v < 3) {
      // External snapshots (src/agent/snapshots.ts): a tree per VM. `files` are the frozen images
      // (one per disk), `state_file` the saved RAM/device state when taken with --memory.
      this.db.exec(`
        CREATE TABLE snapshots (
          vm TEXT NOT NULL,
          name TEXT NOT NULL,
          parent TEXT,
          created_at INTEGER NOT NULL,
          status TEXT NOT NULL,
          files TEXT NOT NULL,
          state_file TEXT,
          was_running INTEGER NOT NULL,
          prev_spec TEXT NOT NULL,
          PRIMARY KEY (vm, name)
        );
        CREATE TABLE snapshot_current (vm TEXT PRIMARY KEY, name TEXT);
        INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', '3');
      `);
    }
  }

  snapshots(vm: string): SnapshotRow[] {
    return (this.db.prepare(`SELECT * FROM snapshots WHERE vm = ? ORDER BY created_at`).all(vm) as Record<string, unknown>[]).map((r) => ({
      vm: r.vm as string,
      name: r.name as string,
      parent: (r.parent as string | null) ?? null,
      createdAt: r.created_at as number,
      status: r.status as SnapshotRow['status'],
      files: JSON.parse(r.files as string) as string[],
      stateFile: (r.state_file as string | null) ?? null,
      wasRunning: !!r.was_running,
      prevSpec: JSON.parse(r.prev_spec as string) as VmSpec,
    }));
  }

  snapshotCurrent(vm: string): string | null {
    return ((this.db.prepare(`SELECT name FROM snapshot_current WHERE vm = ?`).get(vm) as { name: string | null } | undefined)?.name) ?? null;
  }

  /** Runs `fn` in one transaction (snapshot bookkeeping changes several rows at once). */
  tx<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  putSnapshot(s: SnapshotRow): void {
    this.db
      .prepare(`INSERT OR REPLACE INTO snapshots (vm, name, parent, created_at, status, files, state_file, was_running, prev_spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(s.vm, s.name, s.parent, s.createdAt, s.status, JSON.stringify(s.files), s.stateFile, s.wasRunning ? 1 : 0, JSON.stringify(s.prevSpec));
  }

  deleteSnapshot(vm: string, name: string): void {
    this.db.prepare(`DELETE FROM snapshots WHERE vm = ? AND name = ?`).run(vm, name);
  }

  setSnapshotCurrent(vm: string, name: string | null): void {
    this.db.prepare(`INSERT OR REPLACE INTO snapshot_current (vm, name) VALUES (?, ?)`).run(vm, name);
  }

  /** Writes (insert or update) one migration journal row; durable when this returns. */
  putMigration(r: MigrationRow): void {
    this.db
      .prepare(`INSERT INTO migrations (id, role, vm, peer, phase, data, created_at, updated_at) VALUES (@id, @role, @vm, @peer, @phase, @data, @now, @now)
        ON CONFLICT (id, role) DO UPDATE SET phase = excluded.phase, data = excluded.data, updated_at = excluded.updated_at`)
      .run({ ...r, data: JSON.stringify(r.data), now: Date.now() });
  }

  getMigration(id: string, role: string): MigrationRow | undefined {
    const row = this.db.prepare(`SELECT * FROM migrations WHERE id = ? AND role = ?`).get(id, role) as (Omit<MigrationRow, 'data'> & { data: string }) | undefined;
    return row ? { ...row, data: JSON.parse(row.data) as Record<string, unknown> } : undefined;
  }

  listMigrations(limit = 100): MigrationRow[] {
    const rows = this.db.prepare(`SELECT * FROM migrations ORDER BY created_at DESC LIMIT ?`).all(limit) as (Omit<MigrationRow, 'data'> & { data: string })[];
    return rows.map((r) => ({ ...r, data: JSON.parse(r.data) as Record<string, unknown> }));
  }

  listVms(): VmRecord[] {
    const rows = this.db.prepare(`SELECT * FROM vms ORDER BY name`).all() as Row[];
    return rows.map(fromRow);
  }

  getVm(name: string): VmRecord | undefined {
    const row = this.db.prepare(`SELECT * FROM vms WHERE name = ?`).get(name) as Row | undefined;
    return row ? fromRow(row) : undefined;
  }

  insertVm(spec: VmSpec, runtime: VmRuntime): void {
    const now = Date.now();
    this.db
      .prepare(`INSERT INTO vms (name, uuid, spec, runtime, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)`)
      .run(spec.name, spec.uuid, JSON.stringify(spec), JSON.stringify(runtime), now, now);
  }

  setRuntime(name: string, runtime: VmRuntime): void {
    this.db.prepare(`UPDATE vms SET runtime = ?, updated_at = ? WHERE name = ?`).run(JSON.stringify(runtime), Date.now(), name);
  }

  /** Replaces a VM's definition (restore in place, snapshots: its disk files change). */
  setSpec(spec: VmSpec): void {
    this.db.prepare(`UPDATE vms SET spec = ?, updated_at = ? WHERE name = ?`).run(JSON.stringify(spec), Date.now(), spec.name);
  }

  deleteVm(name: string): void {
    this.db.prepare(`DELETE FROM vms WHERE name = ?`).run(name);
    this.db.prepare(`DELETE FROM snapshots WHERE vm = ?`).run(name);
    this.db.prepare(`DELETE FROM snapshot_current WHERE vm = ?`).run(name);
  }

  addEvent(vm: string | null, kind: string, message: string): void {
    this.db.prepare(`INSERT INTO events (ts, vm, kind, message) VALUES (?, ?, ?, ?)`).run(Date.now(), vm, kind, message);
  }

  events(opts: { vm?: string; limit?: number; afterId?: number } = {}): EventRecord[] {
    const limit = Math.min(Math.max(opts.limit ?? 100, 1), 10_000);
    const rows = (
      opts.vm
        ? this.db.prepare(`SELECT * FROM events WHERE vm = ? AND id > ? ORDER BY id DESC LIMIT ?`).all(opts.vm, opts.afterId ?? 0, limit)
        : this.db.prepare(`SELECT * FROM events WHERE id > ? ORDER BY id DESC LIMIT ?`).all(opts.afterId ?? 0, limit)
    ) as EventRecord[];
    return rows.reverse();
  }

  close(): void {
    this.db.close();
  }
}

interface Row {
  name: string;
  uuid: string;
  spec: string;
  runtime: string;
  created_at: number;
  updated_at: number;
}

function fromRow(r: Row): VmRecord {
  return { spec: JSON.parse(r.spec) as VmSpec, runtime: JSON.parse(r.runtime) as VmRuntime, createdAt: r.created_at, updatedAt: r.updated_at };
}
