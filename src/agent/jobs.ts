// Why this file exists: long operations the API starts and the CLI follows (backups, restores,
// snapshots with memory): an id, a state, progress with rate and ETA, then a result or an error.
// Jobs live in memory; what they produce is durable elsewhere (the store, the state database).
import crypto from 'node:crypto';
import { FerryError } from '../errors.js';

export interface JobView {
  id: string;
  kind: string;
  vm: string | null;
  state: 'running' | 'done' | 'failed';
  phase: string;
  startedAt: number;
  endedAt?: number;
  progress: { doneBytes: number; totalBytes: number; bytesPerSec: number; etaSec: number | null };
  result?: unknown;
  error?: { code: string; message: string };
}

export type Report = (phase: string, doneBytes?: number, totalBytes?: number) => void;

export class Jobs {
  private readonly jobs = new Map<string, JobView>();

  start<T>(kind: string, vm: string | null, fn: (report: Report) => Promise<T>): JobView {
    const j: JobView = { id: crypto.randomBytes(6).toString('hex'), kind, vm, state: 'running', phase: 'starting', startedAt: Date.now(), progress: { doneBytes: 0, totalBytes: 0, bytesPerSec: 0, etaSec: null } };
    this.jobs.set(j.id, j);
    let t1 = Date.now();
    const report: Report = (phase, done, total) => {
      if (phase !== j.phase || (done ?? 0) < j.progress.doneBytes) t1 = Date.now();
      j.phase = phase;
      if (done === undefined) return;
      const secs = (Date.now() - t1) / 1000;
      const rate = secs > 0.2 ? done / secs : 0;
      j.progress = { doneBytes: done, totalBytes: total ?? 0, bytesPerSec: Math.round(rate), etaSec: rate > 0 && total ? Math.round((total - done) / rate) : null };
    };
    void fn(report).then(
      (r) => Object.assign(j, { state: 'done', phase: 'done', result: r, endedAt: Date.now() }),
      (e: unknown) => {
        const fe = e instanceof FerryError ? e : undefined;
        Object.assign(j, { state: 'failed', endedAt: Date.now(), error: { code: fe?.code ?? 'INTERNAL', message: (e as Error).message } });
      },
    );
    for (const [id, old] of this.jobs) if (old.endedAt && Date.now() - old.endedAt > 3600_000) this.jobs.delete(id);
    return j;
  }

  get(id: string): JobView {
    const j = this.jobs.get(id);
    if (!j) throw new FerryError('NOT_FOUND', `no job ${id} on this agent (jobs are kept for an hour after they end)`);
    return j;
  }

  list(): JobView[] {
    return [...this.jobs.values()];
  }
}
