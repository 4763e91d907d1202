// Why this file exists: where things live on a host, and the agent's config file. Defaults are
// what an operator expects of a system daemon; every one can be overridden by flag or env so the
// tests and the WAN lab can run several agents side by side on one machine.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FerryError } from './errors.js';

/** The Ferry checkout/package root (same from src/ under vitest and from dist/). */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** Compiled entry points of processes Ferry spawns (agent, relay, probes). */
export const distDir = path.join(repoRoot, 'dist');

export const DEFAULT_DATA_DIR = process.env.FERRY_DATA_DIR ?? '/var/lib/ferry';
export const DEFAULT_IMAGES_DIR = process.env.FERRY_IMAGES_DIR ?? '/var/cache/ferry/images';
export const DEFAULT_LISTEN = '127.0.0.1:7450';
export const DEFAULT_TRANSPORT_LISTEN = '0.0.0.0:7451';
export const GUEST_IMAGE = 'ferry-guest';

export interface AgentConfig {
  /** host:port the HTTP API listens on. */
  listen: string;
  imagesDir: string;
  hostName: string;
  /** host:port the transport (agent-to-agent migration) listens on; default 0.0.0.0:7451 */
  transportListen?: string;
}

export const files = (dataDir: string) => ({
  /** the default chunk store (backups): created on first use */
  store: path.join(dataDir, 'store'),
  config: path.join(dataDir, 'agent.json'),
  token: path.join(dataDir, 'api-token'),
  key: path.join(dataDir, 'host.key'),
  cert: path.join(dataDir, 'host.crt'),
  db: path.join(dataDir, 'state.db'),
  pid: path.join(dataDir, 'agent.pid'),
  vms: path.join(dataDir, 'vms'),
  run: path.join(dataDir, 'run'),
});

export function readConfig(dataDir: string): AgentConfig {
  const f = files(dataDir).config;
  if (!fs.existsSync(f)) {
    throw new FerryError('AGENT_NOT_INITIALIZED', `${dataDir} is not an initialized Ferry data directory: run \`ferry agent init --data-dir ${dataDir}\``);
  }
  return JSON.parse(fs.readFileSync(f, 'utf8')) as AgentConfig;
}

export function writeConfig(dataDir: string, cfg: AgentConfig): void {
  const f = files(dataDir).config;
  fs.writeFileSync(`${f}.tmp`, JSON.stringify(cfg, null, 2) + '\n', { mode: 0o600 });
  fs.renameSync(`${f}.tmp`, f);
}

/** Resolves `p` and throws PATH_OUTSIDE_DATA_DIR unless it lies inside `dataDir`. */
export function insideDataDir(dataDir: string, p: string): string {
  const root = fs.realpathSync(dataDir);
  let abs = path.resolve(root, p);
  try {
    abs = fs.realpathSync(abs);
  } catch {
    /* not existing yet: the lexical check below still applies */
  }
  const rel = path.relative(root, abs);
  if (rel === '' || rel.startsWith('..') || path.isAbsolute(rel)) {
    throw new FerryError('PATH_OUTSIDE_DATA_DIR', `${p} is outside the agent's data directory ${dataDir}`);
  }
  return abs;
}

/**
 * Guest RAM files of an agent's VMs are `<prefix><uuid8>.ram` in /dev/shm (shared by every agent
 * on the machine, so named by data dir). Whoever kills an agent's QEMUs outright (lab teardown,
 * the test harness) removes them with `removeRamFiles`.
 */
export function ramFilePrefix(dataDir: string): string {
  return `/dev/shm/ferry-${crypto.createHash('sha256').update(path.resolve(dataDir)).digest('hex').slice(0, 8)}-`;
}

export function removeRamFiles(dataDir: string): void {
  const prefix = ramFilePrefix(dataDir);
  let names: string[] = [];
  try {
    names = fs.readdirSync(path.dirname(prefix));
  } catch {
    return;
  }
  for (const n of names) if (`/dev/shm/${n}`.startsWith(prefix)) fs.rmSync(`/dev/shm/${n}`, { force: true });
}
