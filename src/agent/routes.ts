// Why this file exists: the agent's HTTP API, one line per route, each delegating to the VM
// manager. Request bodies are validated here (shape) and in the manager (meaning). The CLI's
// client (cli/client.ts) is the reference caller; docs/ARCHITECTURE.md lists the routes.
//
//   GET    /v1/host                         host info (accelerator, versions, identity)
//   GET    /v1/vms                          list
//   POST   /v1/vms                          create  {name, vcpus, memoryMiB, image, disks, nics, workload, append}
//   GET    /v1/vms/:name                    show
//   DELETE /v1/vms/:name?force=&keepDisks=  delete
//   POST   /v1/vms/:name/start|pause|resume
//   POST   /v1/vms/:name/stop|restart       {force, timeoutSec}
//   GET    /v1/vms/:name/console?lines=N&follow=1   serial log (text; follow streams)
//   POST   /v1/vms/:name/console            {data}: type into the serial console
//   GET    /v1/vms/:name/guest              guest probes: heartbeat gaps, durable writes
//   POST   /v1/vms/:name/guest/reset-gap
//   GET    /v1/events?vm=&limit=
//   POST   /v1/vms/:name/migrate                   Ferry live migration {to, bandwidth, maxDowntimeMs, timeoutSec, verify, xbzrle} → view
//   GET    /v1/migrations                          journaled migrations (both roles)
//   GET    /v1/migrations/:key                     one (id, id prefix, or VM name): live view or journal row
//   POST   /v1/migrations/:key/cancel              cancel (before the switchover only)
//   POST   /v1/migrations/native/incoming          destination: {spec, from, listenHost, nbdPort, migratePort, tuning}
//   POST   /v1/migrations/native/incoming/:name/finish   destination: wait, resume
//   POST   /v1/vms/:name/migrate/native            source: {host, nbdPort, migratePort, tuning, timeoutMs, to} → job
//   GET    /v1/vms/:name/migration                 the job (progress, result, guest probes), either side
//   POST   /v1/vms/:name/dirty-since-switchover    destination: pause; extents written since the switchover
//   POST   /v1/vms/:name/backups                   back up a running VM {store, keyFile, full} → job
//   POST   /v1/backups/restore                     {store, keyFile, backup, name | inPlace} → job
//   GET    /v1/jobs, /v1/jobs/:id                  long operations: progress, result, error
//   GET    /v1/vms/:name/snapshots                 the snapshot tree
//   POST   /v1/vms/:name/snapshots                 {name, memory}: take one (live)
//   POST   /v1/vms/:name/snapshots/:snap/revert    return the VM to it
//   DELETE /v1/vms/:name/snapshots/:snap           delete it, merging its data (live)
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { listImages } from '../image/catalog.js';
import type { StateDb } from '../state/db.js';
import { Router, type Req } from './http.js';
import type { MigrateRequest, Migrations } from './migrations.js';
import type { IncomingRequest, NativeMigrations, OutgoingRequest } from './native-migration.js';
import type { Backups } from './backups.js';
import type { Jobs } from './jobs.js';
import type { Snapshots } from './snapshots.js';
import type { CreateRequest, VmManager } from './vms.js';

export interface HostInfo {
  hostName: string;
  version: string;
  accel: string;
  accelReason: string;
  qemuVersion: string;
  dataDir: string;
  imagesDir: string;
  fingerprint: string;
  pid: number;
  startedAt: number;
  memoryRssBytes?: number;
  vms?: number;
  images?: string[];
}

function bool(q: URLSearchParams, k: string, body?: Record<string, unknown>): boolean {
  const v = body?.[k] ?? q.get(k);
  return v === true || v === 'true' || v === '1';
}

function optNumber(body: Record<string, unknown>, k: string): number | undefined {
  const v = body[k];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number') throw new FerryError('INVALID_ARGUMENT', `${k} must be a number`);
  return v;
}

export function buildRouter(vms: VmManager, native: NativeMigrations, migrations: Migrations, db: StateDb, host: () => HostInfo, more: { jobs: Jobs; backups: Backups; snapshots: Snapshots }): Router {
  const r = new Router();
  r.add('GET', '/v1/host', () => {
    const h = host();
    return { ...h, memoryRssBytes: process.memoryUsage().rss, vms: vms.list().length, images: listImages(h.imagesDir).map((i) => i.name) };
  });
  r.add('GET', '/v1/vms', () => vms.list());
  r.add('POST', '/v1/vms', (q) => vms.create(q.body as unknown as CreateRequest));
  r.add('GET', '/v1/vms/:name', (q) => vms.get(q.params.name!));
  r.add('DELETE', '/v1/vms/:name', (q) => vms.delete(q.params.name!, { force: bool(q.query, 'force'), keepDisks: bool(q.query, 'keepDisks') }));
  r.add('POST', '/v1/vms/:name/start', (q) => vms.start(q.params.name!));
  r.add('POST', '/v1/vms/:name/pause', (q) => vms.pause(q.params.name!));
  r.add('POST', '/v1/vms/:name/resume', (q) => vms.resume(q.params.name!));
  r.add('POST', '/v1/vms/:name/stop', (q) => vms.stop(q.params.name!, { force: bool(q.query, 'force', q.body), timeoutSec: optNumber(q.body, 'timeoutSec') }));
  r.add('POST', '/v1/vms/:name/restart', (q) => vms.restart(q.params.name!, { force: bool(q.query, 'force', q.body), timeoutSec: optNumber(q.body, 'timeoutSec') }));
  r.add('GET', '/v1/vms/:name/console', (q) => consoleTail(vms, q));
  r.add('POST', '/v1/vms/:name/console', (q) => {
    vms.sendConsole(q.params.name!, q.body.data as string);
    return { sent: (q.body.data as string).length };
  });
  r.add('GET', '/v1/vms/:name/guest', (q) => vms.guestStats(q.params.name!));
  r.add('POST', '/v1/vms/:name/guest/reset-gap', (q) => {
    vms.resetGuestGap(q.params.name!);
    return { ok: true };
  });
  r.add('POST', '/v1/vms/:name/migrate', (q) => migrations.start(q.params.name!, q.body as MigrateRequest));
  r.add('GET', '/v1/migrations', () => migrations.list());
  r.add('GET', '/v1/migrations/:key', (q) => migrations.get(q.params.key!));
  r.add('POST', '/v1/migrations/:key/cancel', (q) => migrations.cancel(q.params.key!));
  r.add('POST', '/v1/migrations/native/incoming', (q) => native.prepare(q.body as unknown as IncomingRequest));
  r.add('POST', '/v1/migrations/native/incoming/:name/finish', (q) => native.finish(q.params.name!, optNumber(q.body, 'timeoutMs')));
  r.add('POST', '/v1/vms/:name/dirty-since-switchover', (q) => native.dirtySinceSwitchover(q.params.name!));
  r.add('POST', '/v1/vms/:name/migrate/native', (q) => native.start(q.params.name!, q.body as unknown as OutgoingRequest));
  r.add('GET', '/v1/vms/:name/migration', (q) => native.status(q.params.name!));
  r.add('POST', '/v1/vms/:name/backups', (q) => more.backups.create(q.params.name!, q.body as { store?: string; keyFile?: string; full?: boolean }));
  r.add('POST', '/v1/backups/restore', (q) => more.backups.restore(q.body as unknown as { backup: string; store?: string; keyFile?: string; name?: string; inPlace?: boolean }));
  r.add('GET', '/v1/vms/:name/snapshots', (q) => more.snapshots.list(q.params.name!));
  r.add('POST', '/v1/vms/:name/snapshots', (q) => more.snapshots.create(q.params.name!, q.body.name as string, { memory: bool(q.query, 'memory', q.body) }));
  r.add('POST', '/v1/vms/:name/snapshots/:snap/revert', (q) => more.snapshots.revert(q.params.name!, q.params.snap!));
  r.add('DELETE', '/v1/vms/:name/snapshots/:snap', (q) => more.snapshots.delete(q.params.name!, q.params.snap!));
  r.add('GET', '/v1/jobs', () => more.jobs.list());
  r.add('GET', '/v1/jobs/:id', (q) => more.jobs.get(q.params.id!));
  r.add('GET', '/v1/events', (q) => {
    const limit = q.query.get('limit');
    const vm = q.query.get('vm');
    return db.events({ ...(vm ? { vm } : {}), ...(limit ? { limit: Number(limit) } : {}) });
  });
  return r;
}

/** Last `lines` lines of the serial log; with follow=1, keeps streaming appended output. */
function consoleTail(vms: VmManager, q: Req): undefined {
  const file = vms.consoleLogPath(q.params.name!);
  const lines = Math.min(Math.max(Number(q.query.get('lines') ?? 50) || 50, 0), 100_000);
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    /* no output yet */
  }
  const tail = text.split('\n');
  const start = Math.max(0, tail.length - 1 - lines);
  q.res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
  q.res.write(lines === 0 ? '' : tail.slice(start).join('\n'));
  if (!bool(q.query, 'follow')) {
    q.res.end();
    return undefined;
  }
  let offset = Buffer.byteLength(text);
  const timer = setInterval(() => {
    try {
      const size = fs.statSync(file).size;
      if (size > offset) {
        const fd = fs.openSync(file, 'r');
        const buf = Buffer.alloc(size - offset);
        fs.readSync(fd, buf, 0, buf.length, offset);
        fs.closeSync(fd);
        offset = size;
        q.res.write(buf);
      }
    } catch {
      /* log rotated or VM deleted: keep waiting until the client leaves */
    }
  }, 200);
  q.raw.on('close', () => clearInterval(timer));
  return undefined;
}
