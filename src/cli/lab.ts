// Why this file exists: `ferry lab …`, the WAN lab commands (lab/lab.ts does the work).
import { spawnSync } from 'node:child_process';
import type { Command } from 'commander';
import { FerryError } from '../errors.js';
import { labCut, labDown, labHost, labSet, labStatus, labUp, listLabs, readLab, type CongestionControl } from '../lab/lab.js';
import type { LinkParams } from '../lab/link.js';
import { measure, type ProbeKind } from '../lab/measure.js';
import { PROFILES, parseMs, parseProbability, parseRate, profile } from '../lab/profiles.js';
import type { RelayStatus } from '../lab/relay.js';
import { formatBytes } from '../util/units.js';
import { action, globals, say } from './common.js';
import { printJson, table } from './output.js';

function describeRelay(r: RelayStatus): string {
  const rows = Object.entries(r.directions).map(([dir, d]) => ({
    dir,
    rate: d.params.rateBps ? `${d.params.rateBps / 1e6} Mbit/s` : 'unlimited',
    delay: `${d.params.delayMs} ms`,
    jitter: `${d.params.jitterMs} ms`,
    loss: d.params.ge ? `GE ${JSON.stringify(d.params.ge)}` : `${(d.params.loss * 100).toFixed(2)} %`,
    packets: d.counters.packets,
    bytes: formatBytes(d.counters.bytes),
    delivered: formatBytes(d.counters.deliveredBytes),
    'drop q/loss/cut/flow': `${d.counters.dropped.queue}/${d.counters.dropped.loss}/${d.counters.dropped.outage}/${d.counters.dropped.flow}`,
  }));
  const cut = r.cut ? `link DOWN until ${new Date(r.cut.until).toISOString()}${r.cut.flap ? ' (flap)' : ''}` : 'link up';
  const sched = r.scheduledCuts.map((c) => `cut of ${c.seconds} s at ${new Date(c.at).toISOString()}${c.flap ? ' (flap)' : ''}`);
  return [table(rows, Object.keys(rows[0] ?? {})), `${cut}; forgotten flows: ${r.forgottenFlows}; seed ${r.seed}`, ...sched].join('\n');
}

function linkFlags(o: Record<string, string | undefined>): Partial<LinkParams> {
  const p: Partial<LinkParams> = o.profile ? { ...profile(o.profile).link } : {};
  if (o.rate) p.rateBps = parseRate(o.rate);
  if (o.delay) p.delayMs = parseMs(o.delay, '--delay');
  if (o.jitter) p.jitterMs = parseMs(o.jitter, '--jitter');
  if (o.loss) p.loss = parseProbability(o.loss, '--loss');
  if (o.reorder) p.reorder = parseProbability(o.reorder, '--reorder');
  if (o.queue) p.queueBytes = Number(o.queue);
  if (o.ge) {
    const v = o.ge.split(',').map((x) => parseProbability(x, '--ge'));
    if (v.length !== 4) throw new FerryError('INVALID_ARGUMENT', '--ge takes P_GOOD_BAD,P_BAD_GOOD,LOSS_GOOD,LOSS_BAD');
    p.ge = { pGoodBad: v[0]!, pBadGood: v[1]!, lossGood: v[2]!, lossBad: v[3]! };
  }
  if (o.ge === 'off') p.ge = null;
  return p;
}

export function registerLabCommands(program: Command): void {
  const lab = program.command('lab').description('the WAN lab: emulated hosts (network namespaces, one agent each) joined by a packet-level link emulator');
  const nameOpt = ['--name <lab>', 'lab name', 'lab'] as const;

  lab.command('up')
    .description('create the hosts, the link emulator and the agents')
    .option(...nameOpt)
    .option('--hosts <n>', 'number of hosts', '2')
    .option('--profile <name>', `link profile: ${Object.keys(PROFILES).join(', ')}`, 'wan-10')
    .option('--seed <n>', 'seed of the emulator randomness (reproducible runs)', '1')
    .option('--cc <algo>', 'TCP congestion control on WAN routes: cubic (most hosts) or bbr', 'cubic')
    .option('--no-agents', 'namespaces and link only')
    .option('--base <10.N>', 'first two octets of the lab address blocks (uses N, N+1, N+2)', '10.240')
    .action(
      action(async (o: { name: string; hosts: string; profile: string; seed: string; cc: string; agents: boolean; base: string }, cmd: Command) => {
        const g = globals(cmd);
        const s = await labUp({ name: o.name, hosts: Number(o.hosts), profile: o.profile, seed: Number(o.seed), cc: o.cc as CongestionControl, agents: o.agents, base: o.base, say: g.json ? () => {} : (m) => say(m) });
        if (g.json) printJson(s);
      }),
    );

  lab.command('down')
    .description('stop everything in the lab (agents, VMs, emulator) and delete its namespaces')
    .option(...nameOpt)
    .option('--keep-data', "keep the agents' data dirs")
    .action(action(async (o: { name: string; keepData?: boolean }) => void (await labDown(o.name, { keepData: !!o.keepData }))));

  lab.command('status')
    .description('hosts, link settings and per-direction counters')
    .option(...nameOpt)
    .action(
      action(async (o: { name: string }, cmd: Command) => {
        const s = await labStatus(o.name);
        if (globals(cmd).json) return printJson(s);
        say(`lab ${s.lab.name}: profile ${s.lab.profile}, TCP ${s.lab.cc}`);
        say(table(s.lab.hosts.map((h) => ({ host: h.name, netns: h.netns, wan: h.wanIp, api: h.apiUrl, data: h.dataDir })), ['host', 'netns', 'wan', 'api', 'data']));
        say(describeRelay(s.relay));
      }),
    );

  lab.command('list')
    .description('labs that are up')
    .action(
      action((_o: unknown, cmd: Command) => {
        if (globals(cmd).json) printJson(listLabs());
        else say(listLabs().join('\n') || '(none)');
      }),
    );

  lab.command('set')
    .description('change the link live (all directions, or --dir 1>2)')
    .option(...nameOpt)
    .option('--dir <a>b>', 'one direction, e.g. 1>2 (default: all)')
    .option('--profile <name>', 'start from a profile')
    .option('--rate <rate>', 'e.g. 10mbit, 1gbit')
    .option('--delay <ms>', 'one-way delay, e.g. 50ms')
    .option('--jitter <ms>', 'uniform jitter, ± ms')
    .option('--loss <p>', 'i.i.d. loss, e.g. 1%')
    .option('--ge <pGB,pBG,lossG,lossB>', 'Gilbert–Elliott bursty loss (or "off")')
    .option('--reorder <p>', 'probability a packet may overtake')
    .option('--queue <bytes>', 'drop-tail queue limit')
    .action(
      action(async (o: Record<string, string | undefined> & { name: string }, cmd: Command) => {
        const params = linkFlags(o);
        if (Object.keys(params).length === 0) throw new FerryError('INVALID_ARGUMENT', 'nothing to set: give --profile or link flags');
        const r = await labSet(o.name, params, o.dir ?? '*');
        if (globals(cmd).json) printJson(r);
        else say(describeRelay(r));
      }),
    );

  lab.command('cut')
    .description('take the link down (both directions) for a while')
    .option(...nameOpt)
    .option('--seconds <s>', 'how long', '20')
    .option('--in <s>', 'start later, in this many seconds')
    .option('--flap', 'after the outage, drop every TCP flow carried before it for good (NAT/firewall reset)')
    .action(
      action(async (o: { name: string; seconds: string; in?: string; flap?: boolean }, cmd: Command) => {
        const r = await labCut(o.name, { seconds: Number(o.seconds), flap: !!o.flap, ...(o.in ? { inSeconds: Number(o.in) } : {}) });
        if (globals(cmd).json) printJson(r);
        else say(describeRelay(r));
      }),
    );

  lab.command('exec <host> <command...>')
    .description('run a command inside a lab host (e.g. ferry lab exec h1 -- ip addr)')
    .option(...nameOpt)
    .action(
      action((host: string, command: string[], o: { name: string }) => {
        const h = labHost(readLab(o.name), host);
        const r = spawnSync('ip', ['netns', 'exec', h.netns, ...command], { stdio: 'inherit' });
        process.exit(r.status ?? 1);
      }),
    );

  lab.command('cli <host> [args...]')
    .description("run a ferry command against a lab host's agent (e.g. ferry lab cli h1 vm list)")
    .option(...nameOpt)
    .allowUnknownOption()
    .action(
      action((host: string, args: string[], o: { name: string }) => {
        const h = labHost(readLab(o.name), host);
        const r = spawnSync(process.execPath, [process.argv[1]!, '--data-dir', h.dataDir, '--host', h.apiUrl, ...args], { stdio: 'inherit' });
        process.exit(r.status ?? 1);
      }),
    );

  lab.command('measure')
    .description('measure the link from one host to another: rtt, loss, rate (UDP), tcp (one stream)')
    .option(...nameOpt)
    .option('--from <host>', 'sender', 'h1')
    .option('--to <host>', 'receiver', 'h2')
    .option('--kind <kinds>', 'comma-separated: rtt,loss,rate,tcp', 'rtt,loss,rate,tcp')
    .option('--seconds <s>', 'duration of rate and tcp probes', '5')
    .action(
      action(async (o: { name: string; from: string; to: string; kind: string; seconds: string }, cmd: Command) => {
        const lab = await labStatus(o.name);
        const link = lab.relay.directions[`${labHost(lab.lab, o.from).index}>${labHost(lab.lab, o.to).index}`]!.params;
        const out: Record<string, unknown> = { link };
        for (const k of o.kind.split(',') as ProbeKind[]) {
          const opts: Record<string, number> = k === 'rate' ? { seconds: Number(o.seconds), bps: link.rateBps ? link.rateBps * 1.5 : 2e9 } : k === 'tcp' ? { seconds: Number(o.seconds) } : {};
          out[k] = await measure(o.name, o.from, o.to, k, opts);
          if (!globals(cmd).json) say(`${k.padEnd(5)} ${JSON.stringify(out[k])}`);
        }
        if (globals(cmd).json) printJson(out);
      }),
    );
}
