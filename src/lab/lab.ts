// Why this file exists: `ferry lab up|down|status|set|cut`: N emulated hosts on one machine.
// Each host is a network namespace with its own Ferry agent; hosts reach each other only through
// the relay (relay.ts), which emulates the WAN link packet by packet.
//
//   root ns ──fmXXXi/mg0 (10.240.i.0/24, management: the CLI reaches host i's agent API)── host i
//   host i: wan0 = VXLAN (10.242.0.i/24, the host's WAN address, MTU 1450), underlay ul0
//           (10.241.i.2) ──veth── ul<i> (10.241.i.1) in the wan ns, where the relay listens.
//   Every route over wan0 carries `congctl <cc>` (default cubic: most Linux hosts run CUBIC; this
//   machine's default is BBR and namespaces inherit it).
//
// State of a running lab: /run/ferry-lab/<name>/state.json (+ relay config, control socket,
// logs). Agents' data dirs: /var/lib/ferry-lab/<name>/h<i>.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { DEFAULT_IMAGES_DIR, distDir, removeRamFiles } from '../config.js';
import { FerryError } from '../errors.js';
import { missingPackages } from '../setup/packages.js';
import { initAgent, readToken } from '../agent/identity.js';
import { TRANSPORT_PORT } from '../migration/protocol.js';
import { trustHost } from '../transport/tls.js';
import { AgentClient } from '../cli/client.js';
import { run, runAllowFail } from '../util/exec.js';
import { waitFor } from '../util/wait.js';
import type { LinkParams } from './link.js';
import { profile as getProfile } from './profiles.js';
import type { RelayConfig, RelayStatus } from './relay.js';

const RUN_ROOT = process.env.FERRY_LAB_RUN ?? '/run/ferry-lab';
const DATA_ROOT = process.env.FERRY_LAB_DATA ?? '/var/lib/ferry-lab';
export const AGENT_PORT = 7450;

export type CongestionControl = 'cubic' | 'bbr';

export interface LabHost {
  index: number;
  name: string;
  netns: string;
  wanIp: string;
  mgmtIp: string;
  mac: string;
  dataDir: string;
  apiUrl: string;
  agentPid?: number;
}

export interface LabState {
  name: string;
  base: string;
  createdAt: number;
  profile: string;
  cc: CongestionControl;
  seed: number;
  wanNetns: string;
  relayPid: number;
  control: string;
  hosts: LabHost[];
}

const runDir = (name: string) => path.join(RUN_ROOT, name);
const stateFile = (name: string) => path.join(runDir(name), 'state.json');

/** Root-namespace veth names carry a tag of the lab name (interface names are ≤ 15 chars). */
const vethTag = (name: string) => crypto.createHash('sha256').update(name).digest('hex').slice(0, 4);
const rootVeth = (name: string, i: number) => `fm${vethTag(name)}h${i}`;

function checkLabName(name: string): void {
  if (!/^[a-z][a-z0-9]{0,7}$/.test(name)) throw new FerryError('INVALID_ARGUMENT', `lab name must be 1-8 of a-z0-9, starting with a letter: "${name}"`);
}

export function readLab(name: string): LabState {
  checkLabName(name);
  try {
    return JSON.parse(fs.readFileSync(stateFile(name), 'utf8')) as LabState;
  } catch {
    throw new FerryError('LAB_NOT_FOUND', `no lab "${name}" is up (start one with \`ferry lab up\`)`);
  }
}

export function labHost(lab: LabState, host: string): LabHost {
  const h = lab.hosts.find((x) => x.name === host || String(x.index) === host);
  if (!h) throw new FerryError('INVALID_ARGUMENT', `lab "${lab.name}" has no host "${host}" (hosts: ${lab.hosts.map((x) => x.name).join(', ')})`);
  return h;
}

export function labClient(h: LabHost): AgentClient {
  return new AgentClient({ dataDir: h.dataDir, host: h.apiUrl, token: readToken(h.dataDir) });
}

const ip = (args: string[]) => run('ip', args);

export interface UpOptions {
  name?: string;
  hosts?: number;
  profile?: string;
  seed?: number;
  cc?: CongestionControl;
  agents?: boolean;
  /** first two octets of the lab's address blocks */
  base?: string;
  /** schedule the profile's outage (if any) from now; the benchmark schedules its own */
  scheduleOutage?: boolean;
  say?: (m: string) => void;
}

export async function labUp(o: UpOptions = {}): Promise<LabState> {
  const name = o.name ?? 'lab';
  checkLabName(name);
  const n = o.hosts ?? 2;
  if (!Number.isInteger(n) || n < 2 || n > 16) throw new FerryError('INVALID_ARGUMENT', `hosts must be 2..16, got ${n}`);
  const prof = getProfile(o.profile ?? 'wan-10');
  const cc = o.cc ?? 'cubic';
  if (cc !== 'cubic' && cc !== 'bbr') throw new FerryError('INVALID_ARGUMENT', `congestion control must be cubic or bbr`);
  const base = o.base ?? '10.240';
  if (!/^10\.\d{1,3}$/.test(base) || Number(base.split('.')[1]) > 252) throw new FerryError('INVALID_ARGUMENT', `base must look like 10.240`);
  const say = o.say ?? (() => {});
  if (process.getuid?.() !== 0) throw new FerryError('SETUP_REQUIRED', 'the WAN lab needs root (network namespaces)');
  // On a fresh machine `ferry setup` has not run yet: say what is missing before half a lab is up.
  const missing = await missingPackages(['iproute2', 'ethtool', 'qemu-system-x86', 'qemu-utils']);
  if (missing.length) throw new FerryError('SETUP_REQUIRED', `the WAN lab needs Debian packages that are not installed: ${missing.join(', ')} (run \`ferry setup\` as root)`, { details: { missing } });
  if (fs.existsSync(stateFile(name))) throw new FerryError('LAB_EXISTS', `lab "${name}" is already up (\`ferry lab down --name ${name}\` first)`);
  const [b0, b1] = base.split('.').map(Number) as [number, number];
  const mgmt = (i: number, h: number) => `${b0}.${b1}.${i}.${h}`;
  const under = (i: number, h: number) => `${b0}.${b1 + 1}.${i}.${h}`;
  const wan = (i: number) => `${b0}.${b1 + 2}.0.${i}`;
  const dir = runDir(name);
  fs.mkdirSync(dir, { recursive: true });
  const wanNs = `ferry-${name}-wan`;
  const hosts: LabHost[] = [];
  for (let i = 1; i <= n; i++) {
    hosts.push({
      index: i,
      name: `h${i}`,
      netns: `ferry-${name}-h${i}`,
      wanIp: wan(i),
      mgmtIp: mgmt(i, 2),
      mac: `02:fe:00:00:${b1.toString(16).padStart(2, '0')}:${i.toString(16).padStart(2, '0')}`,
      dataDir: path.join(DATA_ROOT, name, `h${i}`),
      apiUrl: `http://${mgmt(i, 2)}:${AGENT_PORT}`,
    });
  }
  const state: LabState = { name, base, createdAt: Date.now(), profile: prof.name, cc, seed: o.seed ?? 1, wanNetns: wanNs, relayPid: 0, control: path.join(dir, 'relay.sock'), hosts };
  try {
    say(`namespaces: ${wanNs} + ${hosts.map((h) => h.netns).join(', ')}`);
    await ip(['netns', 'add', wanNs]);
    await ip(['-n', wanNs, 'link', 'set', 'lo', 'up']);
    for (const h of hosts) {
      const i = h.index;
      await ip(['netns', 'add', h.netns]);
      await ip(['-n', h.netns, 'link', 'set', 'lo', 'up']);
      const rootSide = rootVeth(name, i);
      // A dead lab's namespace can outlive `ip netns del` in the kernel (a TCP socket of a
      // forgotten flow still retransmitting holds it); its root-side veth must not block us.
      await runAllowFail('ip', ['link', 'del', rootSide]);
      await ip(['link', 'add', rootSide, 'type', 'veth', 'peer', 'name', 'mg0', 'netns', h.netns]);
      await ip(['addr', 'add', `${mgmt(i, 1)}/24`, 'dev', rootSide]);
      await ip(['link', 'set', rootSide, 'up']);
      await ip(['-n', h.netns, 'addr', 'add', `${h.mgmtIp}/24`, 'dev', 'mg0']);
      await ip(['-n', h.netns, 'link', 'set', 'mg0', 'up']);
      await ip(['-n', wanNs, 'link', 'add', `ul${i}`, 'type', 'veth', 'peer', 'name', 'ul0', 'netns', h.netns]);
      await ip(['-n', wanNs, 'addr', 'add', `${under(i, 1)}/24`, 'dev', `ul${i}`]);
      await ip(['-n', wanNs, 'link', 'set', `ul${i}`, 'up']);
      await ip(['-n', h.netns, 'addr', 'add', `${under(i, 2)}/24`, 'dev', 'ul0']);
      await ip(['-n', h.netns, 'link', 'set', 'ul0', 'up']);
      await ip(['-n', h.netns, 'link', 'add', 'wan0', 'type', 'vxlan', 'id', '42', 'local', under(i, 2), 'remote', under(i, 1), 'dstport', '4789', 'dev', 'ul0', 'nolearning']);
      await ip(['-n', h.netns, 'link', 'set', 'wan0', 'address', h.mac, 'mtu', '1450', 'up']);
      // Frames detour through the relay in user space, where no NIC fills in offloaded
      // checksums: compute them in software.
      await run('ip', ['netns', 'exec', h.netns, 'ethtool', '-K', 'wan0', 'tx', 'off']);
      await ip(['-n', h.netns, 'addr', 'add', `${h.wanIp}/24`, 'dev', 'wan0', 'noprefixroute']);
      await ip(['-n', h.netns, 'route', 'replace', `${wan(0)}/24`, 'dev', 'wan0', 'src', h.wanIp, 'congctl', cc]);
      for (const o2 of hosts) if (o2 !== h) await ip(['-n', h.netns, 'neigh', 'replace', o2.wanIp, 'lladdr', o2.mac, 'dev', 'wan0', 'nud', 'permanent']);
    }
    const relayCfg: RelayConfig = { hosts: hosts.map((h) => ({ index: h.index, mac: h.mac, underlayIp: under(h.index, 2) })), link: prof.link, seed: state.seed, control: state.control };
    fs.writeFileSync(path.join(dir, 'relay.json'), JSON.stringify(relayCfg, null, 2));
    state.relayPid = spawnDetached(['ip', 'netns', 'exec', wanNs, process.execPath, path.join(distDir, 'lab', 'relay-main.js'), path.join(dir, 'relay.json')], path.join(dir, 'relay.log'));
    await waitFor('the relay', 10_000, async () => (await relayCommand(state, { op: 'status' }), true));
    say(`relay up (pid ${state.relayPid}); link ${prof.name}: ${prof.description}; TCP congestion control ${cc}`);
    fs.writeFileSync(stateFile(name), JSON.stringify(state, null, 2));
    if (o.agents !== false) {
      const fps = new Map<string, string>();
      for (const h of hosts) {
        fs.rmSync(h.dataDir, { recursive: true, force: true });
        fps.set(h.name, (await initAgent(h.dataDir, { listen: `0.0.0.0:${AGENT_PORT}`, imagesDir: DEFAULT_IMAGES_DIR, hostName: h.name, transportListen: `0.0.0.0:${TRANSPORT_PORT}` })).fingerprint);
      }
      // Lab hosts trust each other (as an operator would with `ferry host trust`), by WAN address.
      for (const h of hosts) for (const o2 of hosts) if (o2 !== h) trustHost(h.dataDir, { name: o2.name, url: `ferry://${o2.wanIp}:${TRANSPORT_PORT}`, fingerprint: fps.get(o2.name)! });
      for (const h of hosts) {
        h.agentPid = spawnDetached(['ip', 'netns', 'exec', h.netns, process.execPath, path.join(distDir, 'cli', 'main.js'), '--data-dir', h.dataDir, 'agent', 'run'], path.join(h.dataDir, 'agent.log'));
      }
      for (const h of hosts) {
        await waitFor(`agent ${h.name}`, 60_000, () => labClient(h).get('/v1/host'));
        say(`agent ${h.name}: ${h.apiUrl} (WAN address ${h.wanIp})`);
      }
      fs.writeFileSync(stateFile(name), JSON.stringify(state, null, 2));
    }
    if (prof.outage && o.scheduleOutage !== false) {
      await labCut(name, { seconds: prof.outage.seconds, flap: prof.outage.flap, inSeconds: prof.outage.afterSeconds });
      say(`outage scheduled: ${prof.outage.seconds} s starting in ${prof.outage.afterSeconds} s${prof.outage.flap ? ' (flap: flows forgotten)' : ''}`);
    }
    return state;
  } catch (e) {
    await labDown(name, { force: true, partial: state }).catch(() => {});
    throw e;
  }
}

/**
 * Kills a lab host's agent with `signal` (SIGKILL = a crash; its VMs keep running) and starts a
 * new one, with `env` added (fault injection such as FERRY_CRASH_AT). Waits for its API.
 */
export async function labRestartAgent(name: string, host: string, o: { signal?: NodeJS.Signals; env?: Record<string, string>; start?: boolean } = {}): Promise<void> {
  const lab = readLab(name);
  const h = labHost(lab, host);
  if (h.agentPid) {
    try {
      process.kill(h.agentPid, o.signal ?? 'SIGKILL');
    } catch {
      /* already gone */
    }
    await waitFor(`agent ${h.name} to exit`, 15_000, () => (fs.existsSync(`/proc/${h.agentPid}`) && !fs.readFileSync(`/proc/${h.agentPid}/stat`, 'utf8').includes(') Z') ? undefined : true));
  }
  if (o.start === false) return;
  h.agentPid = spawnDetached(['ip', 'netns', 'exec', h.netns, process.execPath, path.join(distDir, 'cli', 'main.js'), '--data-dir', h.dataDir, 'agent', 'run'], path.join(h.dataDir, 'agent.log'), o.env);
  fs.writeFileSync(stateFile(name), JSON.stringify(lab, null, 2));
  await waitFor(`agent ${h.name}`, 60_000, () => labClient(h).get('/v1/host'));
}

function spawnDetached(argv: string[], log: string, env?: Record<string, string>): number {
  fs.mkdirSync(path.dirname(log), { recursive: true });
  const fd = fs.openSync(log, 'a');
  const p = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', fd, fd], env: { ...process.env, ...env } });
  fs.closeSync(fd);
  p.unref();
  return p.pid!;
}

export function relayCommand<T = RelayStatus>(lab: Pick<LabState, 'control'>, cmd: Record<string, unknown>): Promise<T> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection(lab.control);
    let buf = '';
    c.on('connect', () => c.write(JSON.stringify(cmd) + '\n'));
    c.on('data', (d) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      c.destroy();
      const r = JSON.parse(buf.slice(0, nl)) as { ok: boolean; result?: T; error?: string };
      if (r.ok) resolve(r.result as T);
      else reject(new FerryError('INVALID_ARGUMENT', `relay: ${r.error}`));
    });
    c.on('error', (e) => reject(new FerryError('COMMAND_FAILED', `cannot reach the lab relay at ${lab.control}: ${e.message}`)));
  });
}

export async function labDown(name: string, o: { force?: boolean; keepData?: boolean; partial?: LabState } = {}): Promise<void> {
  let lab: LabState;
  try {
    lab = o.partial ?? readLab(name);
  } catch (e) {
    if (o.force) return;
    throw e;
  }
  // Everything running inside the lab's namespaces (agents, QEMU, relay) is killed outright.
  for (const ns of [...lab.hosts.map((h) => h.netns), lab.wanNetns]) {
    const r = await runAllowFail('ip', ['netns', 'pids', ns]);
    for (const pid of r.stdout.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
  for (const pid of [lab.relayPid, ...lab.hosts.map((h) => h.agentPid ?? 0)]) {
    try {
      if (pid) process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
  await new Promise((r) => setTimeout(r, 200));
  for (const ns of [...lab.hosts.map((h) => h.netns), lab.wanNetns]) await runAllowFail('ip', ['netns', 'del', ns]);
  // The kernel may keep a deleted namespace alive (sockets still draining); cut its veths now.
  for (const h of lab.hosts) await runAllowFail('ip', ['link', 'del', rootVeth(lab.name, h.index)]);
  for (const h of lab.hosts) removeRamFiles(h.dataDir); // its QEMUs were killed outright
  if (!o.keepData) fs.rmSync(path.join(DATA_ROOT, lab.name), { recursive: true, force: true });
  fs.rmSync(runDir(lab.name), { recursive: true, force: true });
}

export async function labSet(name: string, params: Partial<LinkParams>, dir = '*'): Promise<RelayStatus> {
  return relayCommand(readLab(name), { op: 'set', dir, params });
}

export async function labCut(name: string, o: { seconds: number; flap?: boolean; inSeconds?: number }): Promise<RelayStatus> {
  const at = o.inSeconds ? Date.now() + o.inSeconds * 1000 : undefined;
  return relayCommand(readLab(name), { op: 'cut', seconds: o.seconds, flap: !!o.flap, ...(at ? { at } : {}) });
}

export async function labStatus(name: string): Promise<{ lab: LabState; relay: RelayStatus }> {
  const lab = readLab(name);
  return { lab, relay: await relayCommand(lab, { op: 'status' }) };
}

export function listLabs(): string[] {
  try {
    return fs.readdirSync(RUN_ROOT).filter((n) => fs.existsSync(stateFile(n)));
  } catch {
    return [];
  }
}
