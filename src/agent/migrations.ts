// Why this file exists: the agent's side of Ferry's own live migration. It listens for peers on
// the transport port (mutual TLS, pinned fingerprints), runs destination handlers for incoming
// sessions, starts source migrations for the API (`POST /v1/vms/:name/migrate`), keeps their
// live views for `ferry migrate status`, and at startup recovers whatever the journal shows
// unfinished. It adapts the migration module to this host (VM manager, paths, identity); the
// protocol itself lives in src/migration/.
import fs from 'node:fs';
import path from 'node:path';
import { files } from '../config.js';
import { FerryError } from '../errors.js';
import { readImage } from '../image/catalog.js';
import { serveSession, type DestHost, type DestinationMigration } from '../migration/destination.js';
import { Journal } from '../migration/journal.js';
import { TRANSPORT_PORT } from '../migration/protocol.js';
import { recoverDest, recoverSource, type RecoverHost } from '../migration/recover.js';
import { buildManifest } from '../migration/snapshot-chain.js';
import { SourceMigration, type MigrateOptions, type MigrationView, type SourceHost } from '../migration/source.js';
import type { MigrationRow, StateDb } from '../state/db.js';
import { templateIndex } from '../storage/chunk-index.js';
import { backupSeed } from '../store/seed.js';
import { dial, listen, type Listener } from '../transport/endpoint.js';
import { loadIdentity, readTrust } from '../transport/tls.js';
import type { VmSpec } from '../vm/spec.js';
import type { VmManager } from './vms.js';

export interface MigrateRequest {
  to?: unknown;
  bandwidth?: unknown;
  maxDowntimeMs?: unknown;
  timeoutSec?: unknown;
  verify?: unknown;
  xbzrle?: unknown;
  keepSource?: unknown;
}

export function parseUrl(url: string): { host: string; port: number } {
  const m = /^(?:ferry:\/\/)?\[?([^\]/]+?)\]?(?::(\d+))?\/?$/.exec(url);
  if (!m) throw new FerryError('INVALID_ARGUMENT', `not a transport address: "${url}" (expected ferry://HOST[:PORT])`);
  return { host: m[1]!, port: m[2] ? Number(m[2]) : TRANSPORT_PORT };
}

export class Migrations {
  readonly journal: Journal;
  private readonly jobs = new Map<string, SourceMigration>();
  private readonly live = new Map<string, DestinationMigration>();
  private listener: Listener | undefined;

  constructor(
    private readonly vms: VmManager,
    private readonly db: StateDb,
    private readonly host: { hostName: string; qemuVersion: string; dataDir: string; imagesDir: string },
    private readonly log: (m: string) => void,
  ) {
    this.journal = new Journal(db);
  }

  async listen(addr: string): Promise<void> {
    const { host, port } = parseUrl(addr);
    this.listener = await listen({
      host,
      port,
      security: { identity: loadIdentity(this.host.dataDir) },
      session: { resumeLimitMs: 3 * 3600_000 },
      onSession: (s, peerFp) => serveSession(this.destHost(), s, this.peerName(peerFp)),
      onRefused: (why) => this.log(`transport: refused a peer: ${why}`),
    });
  }

  close(): void {
    this.listener?.close();
  }

  private peerName(fp: string): string {
    return readTrust(this.host.dataDir).find((t) => t.fingerprint === fp)?.name ?? fp.slice(0, 11);
  }

  private dial: SourceHost['dial'] = (url, o) => {
    const { host, port } = parseUrl(url);
    return dial({ host, port, security: { identity: loadIdentity(this.host.dataDir) }, session: { resumeLimitMs: o.resumeLimitMs, ...(o.rateBytesPerSec ? { rateBytesPerSec: o.rateBytesPerSec } : {}) }, connectTimeoutMs: 10_000 });
  };

  private diskPath(spec: VmSpec, file: string): string {
    return file.startsWith('/') ? file : path.join(this.vms.paths(spec).dir, file);
  }

  private sourceHost(): SourceHost {
    return {
      hostName: this.host.hostName,
      qemuVersion: this.host.qemuVersion,
      journal: this.journal,
      dial: this.dial,
      vm: (name) => {
        const { rec, inst } = this.vms.running(name);
        return { spec: rec.spec, inst, state: rec.runtime.state };
      },
      guestStats: (name) => this.vms.guestStats(name),
      allocatedBytes: (spec) => spec.disks.map((d) => {
        try {
          return fs.statSync(this.diskPath(spec, d.file)).blocks * 512;
        } catch {
          return d.sizeBytes;
        }
      }),
      nbdSocket: (spec) => `${this.vms.paths(spec).qmpSocket}.mnbd`,
      ramSocket: (spec) => `${this.vms.paths(spec).qmpSocket}.ram`,
      ramFile: (spec) => this.vms.paths(spec).ramFile,
      reserve: (name) => this.vms.reserve(name),
      release: (name) => this.vms.release(name),
      migratedAway: (name, to, keep) => this.vms.migratedAway(name, to, keep),
      vmDir: (spec) => this.vms.paths(spec).dir,
      chain: (spec) => buildManifest(this.vms.paths(spec).dir, this.db.snapshots(spec.name), this.db.snapshotCurrent(spec.name), spec.disks.map((d) => this.diskPath(spec, d.file))),
    };
  }

  private destHost(): DestHost {
    return {
      hostName: this.host.hostName,
      qemuVersion: this.host.qemuVersion,
      dataDir: this.host.dataDir,
      journal: this.journal,
      live: this.live,
      vmExists: (name) => this.vms.list().some((v) => v.name === name),
      imageProblem: (spec) => {
        if (!spec.image) return null;
        try {
          readImage(this.host.imagesDir, spec.image);
          return null;
        } catch (e) {
          return `guest image "${spec.image}" is not installed here: ${(e as Error).message}`;
        }
      },
      createIncoming: async (spec, from, cacheDir, chain) => {
        const r = await this.vms.createIncoming(spec, from, { cacheDir, ...(chain ? { chain } : {}) });
        return { inst: r.inst, bases: r.bases, spec: r.view.spec };
      },
      nbdSocket: (spec) => `${this.vms.paths(spec).qmpSocket}.mnbd`,
      ramSocket: (spec) => `${this.vms.paths(spec).qmpSocket}.ram`,
      ramFile: (spec) => this.vms.paths(spec).ramFile,
      activate: (name, from) => this.vms.activateIncoming(name, from),
      discard: (name, cacheDir) => this.vms.discardIncoming(name, cacheDir),
      chunkIndexes: async (spec) => {
        const templates = await Promise.all([...new Set(spec.disks.map((d) => d.backing).filter((b): b is string => !!b && fs.existsSync(b)))].map((t) => templateIndex(t)));
        const seed = backupSeed(files(this.host.dataDir).store, spec);
        return seed ? [...templates, seed] : templates;
      },
    };
  }

  /** Validates, then starts a migration in the background; returns its first view. */
  start(vm: string, req: MigrateRequest): MigrationView {
    const problems: string[] = [];
    const to = typeof req.to === 'string' ? req.to : '';
    if (!to) throw new FerryError('INVALID_ARGUMENT', 'to: the destination host name (one of `ferry host trusted`) is required');
    const num = (k: keyof MigrateRequest, def: number, min: number, max: number): number => {
      const v = req[k] ?? def;
      if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw new FerryError('INVALID_ARGUMENT', `${k} must be a number between ${min} and ${max}`);
      return v;
    };
    const verify = req.verify ?? 'full';
    if (verify !== 'full' && verify !== 'sample') throw new FerryError('INVALID_ARGUMENT', 'verify must be "full" or "sample"');
    const o: MigrateOptions = {
      to,
      url: '',
      bandwidth: num('bandwidth', 0, 0, 100e9),
      maxDowntimeMs: num('maxDowntimeMs', 300, 10, 60_000),
      timeoutSec: num('timeoutSec', 3600, 10, 7 * 86400),
      verify,
      xbzrle: req.xbzrle === true,
      keepSource: req.keepSource === true,
    };
    const trusted = readTrust(this.host.dataDir).find((t) => t.name === to);
    if (!trusted) problems.push(`"${to}" is not a trusted host (trusted: ${readTrust(this.host.dataDir).map((t) => t.name).join(', ') || 'none'}; add it with \`ferry host trust\`)`);
    else o.url = trusted.url;
    const v = this.vms.get(vm); // VM_NOT_FOUND
    if (v.state !== 'running') problems.push(`VM "${vm}" is ${v.state}; only a running VM can be live-migrated`);
    const active = [...this.jobs.values()].find((j) => j.vmName === vm && !j.view.endedAt);
    if (active) problems.push(`VM "${vm}" is already migrating (${active.id.slice(0, 8)})`);
    if (problems.length) throw new FerryError(active ? 'VM_BUSY' : !trusted ? 'HOST_NOT_FOUND' : 'VM_NOT_RUNNING', problems.join('; '), { details: { problems } });
    const m = new SourceMigration(this.sourceHost(), vm, o);
    this.jobs.set(m.id, m);
    void m.run().then(() => this.log(`migration ${m.id.slice(0, 8)} of ${vm} to ${to}: ${m.view.phase}${m.view.error ? ` (${m.view.error.message})` : ''}`));
    return m.view;
  }

  /** A migration by id (or id prefix), or the latest of a VM by name. */
  get(key: string): MigrationView | MigrationRow {
    const live = this.find(key);
    if (live) return live.view;
    const row = this.journal.list(1000).find((r) => r.id === key || r.id.startsWith(key) || r.vm === key);
    if (!row) throw new FerryError('MIGRATION_NOT_FOUND', `no migration "${key}" on this host`);
    return row;
  }

  private find(key: string): SourceMigration | undefined {
    const all = [...this.jobs.values()].reverse();
    return all.find((j) => j.id === key || (key.length >= 4 && j.id.startsWith(key))) ?? all.find((j) => j.vmName === key);
  }

  list(): { id: string; vm: string; role: string; peer: string; phase: string; updatedAt: number }[] {
    return this.journal.list(200).map((r) => ({ id: r.id, vm: r.vm, role: r.role, peer: r.peer, phase: this.jobs.get(r.id)?.view.phase ?? r.phase, updatedAt: r.updated_at ?? 0 }));
  }

  cancel(key: string): MigrationView {
    const m = this.find(key);
    if (!m) throw new FerryError('MIGRATION_NOT_FOUND', `no running migration "${key}" on this host`);
    if (!m.cancel()) throw new FerryError('MIGRATION_SWITCHING', `migration ${m.id.slice(0, 8)} is ${m.view.phase}: past the point where it can be cancelled`);
    return m.view;
  }

  /** Agent start: bring every unfinished journaled migration to a safe end (in the background). */
  recover(): void {
    const h: RecoverHost = {
      journal: this.journal,
      dial: this.dial,
      vm: (name) => {
        try {
          const { rec, inst } = this.vms.running(name);
          return { spec: rec.spec, inst };
        } catch {
          return undefined;
        }
      },
      migratedAway: (name, to) => this.vms.migratedAway(name, to, false),
      activate: (name, from) => this.vms.activateIncoming(name, from),
      resumed: (name) => this.vms.noteRunning(name, 'migration rolled back after an agent restart'),
      discard: (name, uuid) => this.vms.discardIncoming(name, path.join(this.host.dataDir, 'migration-cache', uuid)),
      log: this.log,
    };
    for (const r of this.journal.unfinished()) {
      this.log(`recovering migration ${r.id.slice(0, 8)} (${r.role}, ${r.vm}, phase ${r.phase})`);
      const busy = r.role === 'source';
      if (busy) {
        try {
          this.vms.reserve(r.vm);
        } catch {
          /* VM gone */
        }
      }
      void (r.role === 'source' ? recoverSource(h, r) : recoverDest(h, r))
        .catch((e) => this.log(`recovery of migration ${r.id.slice(0, 8)} failed: ${(e as Error).message}`))
        .finally(() => {
          if (busy) this.vms.release(r.vm);
          this.log(`migration ${r.id.slice(0, 8)}: recovered to ${this.journal.get(r.id, r.role)?.phase}`);
        });
    }
  }
}
