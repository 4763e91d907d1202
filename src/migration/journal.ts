// Why this file exists: the migration journal — each side's phase of each migration, written to
// the host's SQLite database (synchronous=FULL) *before* the phase's side effects, so an agent
// restarted after a crash knows exactly what may have happened and recovers (recover.ts).
import type { MigrationRow, StateDb } from '../state/db.js';

/** Source phases, in order; `rollback` and `failed`/`done` are the ends. */
export type SourcePhase = 'begin' | 'prepare' | 'disk' | 'ram' | 'switchover' | 'confirm' | 'done' | 'rollback' | 'failed' | 'cancelled';
/** Destination phases. */
export type DestPhase = 'prepare' | 'receiving' | 'finishing' | 'running' | 'done' | 'aborted';

export const SOURCE_ENDED: readonly SourcePhase[] = ['done', 'failed', 'cancelled'];
export const DEST_ENDED: readonly DestPhase[] = ['done', 'aborted'];

export interface SourceData {
  to: string;
  url: string;
  error?: string;
  [k: string]: unknown;
}

/**
 * Fault injection for the crash tests: FERRY_CRASH_AT=source:disk (or destination:running, …)
 * makes the agent kill itself with SIGKILL right after journaling that phase, exactly where a
 * real crash would leave the journal and the world.
 */
function crashPoint(role: string, phase: string): void {
  if (process.env.FERRY_CRASH_AT === `${role}:${phase}`) process.kill(process.pid, 'SIGKILL');
}

export class Journal {
  constructor(private readonly db: StateDb) {}

  source(id: string, vm: string, peer: string, phase: SourcePhase, data: SourceData): void {
    this.db.putMigration({ id, role: 'source', vm, peer, phase, data });
    this.db.addEvent(vm, `migration-${phase}`, `migration ${id.slice(0, 8)} to ${peer}: ${phase}${data.error ? ` (${data.error})` : ''}`);
    crashPoint('source', phase);
  }

  dest(id: string, vm: string, peer: string, phase: DestPhase, data: Record<string, unknown> = {}): void {
    this.db.putMigration({ id, role: 'destination', vm, peer, phase, data });
    this.db.addEvent(vm, `incoming-${phase}`, `incoming migration ${id.slice(0, 8)} from ${peer}: ${phase}${data.error ? ` (${String(data.error)})` : ''}`);
    crashPoint('destination', phase);
  }

  get(id: string, role: 'source' | 'destination'): MigrationRow | undefined {
    return this.db.getMigration(id, role);
  }

  list(limit = 100): MigrationRow[] {
    return this.db.listMigrations(limit);
  }

  /** Rows not in an end phase: what a restarted agent must recover. */
  unfinished(): MigrationRow[] {
    return this.db.listMigrations(10_000).filter((r) => (r.role === 'source' ? !SOURCE_ENDED.includes(r.phase as SourcePhase) : !DEST_ENDED.includes(r.phase as DestPhase)));
  }
}
