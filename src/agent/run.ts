// Why this file exists: `ferry agent run`, the host daemon's main. It takes the data dir's lock
// (one agent per data dir), opens the state DB, decides KVM or TCG, re-adopts VMs an earlier
// agent left running, and serves the HTTP API until SIGTERM/SIGINT. Stopping the agent never
// stops VMs: they keep running and the next agent re-attaches.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { DEFAULT_TRANSPORT_LISTEN, files, readConfig } from '../config.js';
import { FerryError } from '../errors.js';
import { readImage } from '../image/catalog.js';
import { detectAccel, QEMU_BIN } from '../qemu/accel.js';
import { pidAlive } from '../qemu/instance.js';
import { StateDb } from '../state/db.js';
import { run } from '../util/exec.js';
import { createServer } from './http.js';
import { certFingerprint, readToken } from './identity.js';
import { buildRouter, type HostInfo } from './routes.js';
import { Backups } from './backups.js';
import { Jobs } from './jobs.js';
import { Migrations } from './migrations.js';
import { Snapshots } from './snapshots.js';
import { NativeMigrations } from './native-migration.js';
import { VmManager } from './vms.js';

const version = (createRequire(import.meta.url)('../../package.json') as { version: string }).version;

/** Takes the data dir's pid lock; refuses if another live agent holds it. */
function lock(pidFile: string): void {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(pidFile, String(process.pid), { flag: 'wx', mode: 0o600 });
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const other = Number(fs.readFileSync(pidFile, 'utf8').trim());
      let cmd = '';
      try {
        cmd = fs.readFileSync(`/proc/${other}/cmdline`, 'utf8');
      } catch {
        /* gone */
      }
      if (other && other !== process.pid && pidAlive(other) && cmd.includes('agent')) {
        throw new FerryError('AGENT_ALREADY_RUNNING', `an agent (pid ${other}) already runs on this data directory`);
      }
      fs.rmSync(pidFile, { force: true }); // stale lock from a dead agent
    }
  }
  throw new FerryError('AGENT_ALREADY_RUNNING', `cannot take the lock ${pidFile}`);
}

export async function runAgent(dataDir: string, opts: { listen?: string; log?: (m: string) => void } = {}): Promise<void> {
  const log = opts.log ?? ((m: string) => console.log(`${new Date().toISOString()} ${m}`));
  // The agent owns running VMs: a stray rejection in one operation must not take it down.
  process.on('unhandledRejection', (e) => log(`BUG: unhandled rejection: ${(e as Error)?.stack ?? String(e)}`));
  const cfg = readConfig(dataDir);
  const f = files(dataDir);
  if (!fs.existsSync(f.token)) throw new FerryError('AGENT_NOT_INITIALIZED', `no API token in ${dataDir}: run \`ferry agent init\``);
  lock(f.pid);
  const db = new StateDb(f.db);
  let kernel: string | undefined;
  try {
    kernel = readImage(cfg.imagesDir, 'ferry-guest').kernel;
  } catch {
    kernel = undefined;
  }
  const accel = await detectAccel(kernel);
  const qemuVersion = (await run(QEMU_BIN, ['--version']).catch(() => ({ stdout: 'unknown' }))).stdout.split('\n')[0]!.trim();
  const vms = new VmManager(db, dataDir, cfg.imagesDir, accel.accel);
  const { reattached, crashed } = await vms.recover();
  const snapshots = new Snapshots(vms, db);
  for (const m of await snapshots.recover()) log(`snapshot recovery: ${m}`);
  const startedAt = Date.now();
  const info: HostInfo = {
    hostName: cfg.hostName,
    version,
    accel: accel.accel,
    accelReason: accel.reason,
    qemuVersion,
    dataDir,
    imagesDir: cfg.imagesDir,
    fingerprint: certFingerprint(fs.readFileSync(f.cert, 'utf8')),
    pid: process.pid,
    startedAt,
  };
  db.addEvent(null, 'agent-started', `pid ${process.pid}, ${accel.accel} (${accel.reason}); re-attached ${reattached.length}, crashed ${crashed.length}`);
  const migrations = new Migrations(vms, db, { hostName: cfg.hostName, qemuVersion, dataDir, imagesDir: cfg.imagesDir }, log);
  const transportListen = cfg.transportListen ?? DEFAULT_TRANSPORT_LISTEN;
  try {
    await migrations.listen(transportListen);
  } catch (e) {
    throw new FerryError('INVALID_ARGUMENT', `cannot listen for migrations on ${transportListen}: ${(e as Error).message}`, { cause: e });
  }
  migrations.recover();
  const jobs = new Jobs();
  const server = createServer(buildRouter(vms, new NativeMigrations(vms), migrations, db, () => info, { jobs, backups: new Backups(vms, jobs, dataDir), snapshots }), readToken(dataDir), log);
  const listen = opts.listen ?? cfg.listen;
  const [hostPart, portPart] = splitHostPort(listen);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new FerryError('INVALID_ARGUMENT', `cannot listen on ${listen}: ${e.message}`, { cause: e })));
    server.listen(portPart, hostPart, resolve);
  });
  log(`migrations: transport on ${transportListen} (TLS, trusted peers only)`);
  log(`ferry agent ${version} on http://${listen} (data ${dataDir}, ${accel.accel}: ${accel.reason})`);
  if (reattached.length) log(`re-attached to running VMs: ${reattached.join(', ')}`);
  if (crashed.length) log(`VMs whose QEMU was gone: ${crashed.join(', ')} (marked crashed)`);

  await new Promise<void>((resolve) => {
    const shutdown = (sig: string) => {
      log(`${sig}: shutting down (VMs keep running)`);
      server.close();
      server.closeAllConnections();
      migrations.close();
      vms.detachAll();
      db.close();
      fs.rmSync(f.pid, { force: true });
      resolve();
    };
    process.once('SIGTERM', () => shutdown('SIGTERM'));
    process.once('SIGINT', () => shutdown('SIGINT'));
  });
}

export function splitHostPort(listen: string): [string, number] {
  const m = /^(.*):(\d+)$/.exec(listen);
  if (!m) throw new FerryError('INVALID_ARGUMENT', `listen address must be HOST:PORT, got "${listen}"`);
  return [m[1]!.replace(/^\[|\]$/g, ''), Number(m[2])];
}
