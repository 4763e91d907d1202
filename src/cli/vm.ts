// Why this file exists: `ferry vm …`, the VM lifecycle commands (virsh-like): create, start,
// stop, pause, resume, restart, delete, show, list, console, guest. Each is one API call.
import type { Command } from 'commander';
import { FerryError } from '../errors.js';
import { formatBytes, formatDuration, parseSize } from '../util/units.js';
import type { VmView } from '../agent/vms.js';
import { action, client, globals, say } from './common.js';
import { printJson, table } from './output.js';

const enc = encodeURIComponent;

function describe(v: VmView): string {
  const rt = v.runtime;
  const lines = [
    `name      ${v.name}`,
    `uuid      ${v.uuid}`,
    `state     ${rt.state}${'reason' in rt && rt.reason ? ` (${rt.reason})` : ''}${'pid' in rt && rt.pid ? `, QEMU pid ${rt.pid}` : ''}`,
    `vcpus     ${v.spec.vcpus}`,
    `memory    ${v.spec.memoryMiB} MiB`,
    `image     ${v.spec.image ?? '-'}`,
  ];
  for (const d of v.spec.disks) lines.push(`disk      ${d.id}  ${formatBytes(d.sizeBytes)}  ${d.file}${d.backing ? `  (overlay on ${d.backing})` : ''}`);
  for (const n of v.spec.nics) lines.push(`nic       ${n.id}  ${n.type}  ${n.mac}`);
  if (v.spec.workload) lines.push(`workload  ${JSON.stringify(v.spec.workload)}`);
  if ('startedAt' in rt) lines.push(`uptime    ${formatDuration(Date.now() - rt.startedAt)}`);
  return lines.join('\n');
}

function showVm(cmd: Command, v: VmView): void {
  if (globals(cmd).json) printJson(v);
  else say(describe(v));
}

function int(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text)) throw new FerryError('INVALID_ARGUMENT', `${what} must be a whole number, got "${text}"`);
  return Number(text);
}

export function registerVmCommands(program: Command): void {
  const vm = program.command('vm').description('virtual machines on the agent');

  vm.command('list')
    .description('list VMs')
    .action(
      action(async (_o: unknown, cmd: Command) => {
        const list = await client(cmd).get<VmView[]>('/v1/vms');
        if (globals(cmd).json) return printJson(list);
        say(
          table(
            list.map((v) => ({ name: v.name, state: v.state, vcpus: v.spec.vcpus, memory: `${v.spec.memoryMiB} MiB`, disks: v.spec.disks.length, pid: 'pid' in v.runtime ? v.runtime.pid : '' })),
            ['name', 'state', 'vcpus', 'memory', 'disks', 'pid'],
          ),
        );
      }),
    );

  vm.command('create <name>')
    .description('define a VM and create its disks')
    .option('--image <name>', 'guest image to boot (kernel + initrd + root template)', 'ferry-guest')
    .option('--no-image', 'no image: boot from the first --disk')
    .option('--vcpus <n>', 'virtual CPUs', '1')
    .option('--memory <size>', 'memory, e.g. 256M, 1G', '256M')
    .option('--system-disk <size>', 'system disk size (overlay on the image template; default: the template size)')
    .option('--disk <size|file>', 'add a blank disk of SIZE, or an existing qcow2 FILE inside the data dir (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--nic <type>', 'add a NIC; type: user (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--heartbeat <hz>', 'guest workload: heartbeat lines per second on the console (0 = off)')
    .option('--write-rate <rate>', 'guest workload: disk writer on the first data disk, bytes/s (e.g. 100K)')
    .option('--seed <n>', 'guest workload: disk writer seed')
    .option('--dirty <size>', 'guest workload: RAM to rewrite continuously (e.g. 16M)')
    .option('--append <args>', 'extra kernel command line')
    .option('--start', 'start it after creating')
    .action(
      action(async (name: string, o: Record<string, unknown>, cmd: Command) => {
        const disks = (o.disk as string[]).map((d) => (/^\d+(\.\d+)?[KMGT]?$/i.test(d) ? { sizeBytes: parseSize(d, '--disk') } : { file: d }));
        const workload: Record<string, number> = {};
        if (o.heartbeat !== undefined) workload.heartbeatHz = int(o.heartbeat as string, '--heartbeat')!;
        if (o.writeRate !== undefined) workload.writeRate = parseSize(o.writeRate as string, '--write-rate');
        if (o.seed !== undefined) workload.seed = int(o.seed as string, '--seed')!;
        if (o.dirty !== undefined) workload.dirtyMiB = Math.round(parseSize(o.dirty as string, '--dirty') / 1024 ** 2);
        const body = {
          name,
          vcpus: int(o.vcpus as string, '--vcpus'),
          memoryMiB: Math.round(parseSize(o.memory as string, '--memory') / 1024 ** 2),
          ...(o.image ? { image: o.image } : {}),
          ...(o.systemDisk ? { systemDiskBytes: parseSize(o.systemDisk as string, '--system-disk') } : {}),
          disks,
          nics: (o.nic as string[]).map((t) => ({ type: t })),
          ...(Object.keys(workload).length ? { workload } : {}),
          ...(o.append ? { append: o.append } : {}),
        };
        const c = client(cmd);
        let v = await c.post<VmView>('/v1/vms', body);
        if (o.start) v = await c.post<VmView>(`/v1/vms/${enc(name)}/start`);
        showVm(cmd, v);
      }),
    );

  vm.command('show <name>')
    .description('show a VM')
    .action(action(async (name: string, _o: unknown, cmd: Command) => showVm(cmd, await client(cmd).get<VmView>(`/v1/vms/${enc(name)}`))));

  for (const [verb, help] of [
    ['start', 'start a stopped (or crashed) VM'],
    ['pause', 'pause a running VM'],
    ['resume', 'resume a paused VM'],
  ] as const) {
    vm.command(`${verb} <name>`)
      .description(help)
      .action(action(async (name: string, _o: unknown, cmd: Command) => showVm(cmd, await client(cmd).post<VmView>(`/v1/vms/${enc(name)}/${verb}`))));
  }

  for (const [verb, help] of [
    ['stop', 'stop a VM: ACPI shutdown, then forced after --timeout'],
    ['restart', 'stop (as stop does), then start'],
  ] as const) {
    vm.command(`${verb} <name>`)
      .description(help)
      .option('--force', 'do not ask the guest: stop QEMU now')
      .option('--timeout <seconds>', 'how long the guest gets to shut down before it is forced', '30')
      .action(
        action(async (name: string, o: { force?: boolean; timeout: string }, cmd: Command) => {
          const body = { force: !!o.force, timeoutSec: int(o.timeout, '--timeout') };
          showVm(cmd, await client(cmd).post<VmView>(`/v1/vms/${enc(name)}/${verb}`, body));
        }),
      );
  }

  vm.command('delete <name>')
    .description('delete a VM and its disks')
    .option('--force', 'stop it first if it is running')
    .option('--keep-disks', 'keep its disk files')
    .action(
      action(async (name: string, o: { force?: boolean; keepDisks?: boolean }, cmd: Command) => {
        const q = new URLSearchParams({ force: String(!!o.force), keepDisks: String(!!o.keepDisks) });
        const r = await client(cmd).del<{ deleted: string; keptDisks: string[] }>(`/v1/vms/${enc(name)}?${q}`);
        if (globals(cmd).json) return printJson(r);
        say(`deleted ${r.deleted}${r.keptDisks.length ? `; disks kept: ${r.keptDisks.join(', ')}` : ''}`);
      }),
    );

  vm.command('console <name>')
    .description('print the serial console log; --follow to keep streaming; --send to type a line')
    .option('-n, --lines <n>', 'how many lines of history', '50')
    .option('-f, --follow', 'keep printing new output (Ctrl-C to stop)')
    .option('--send <line>', 'type this line (plus Enter) into the console')
    .action(
      action(async (name: string, o: { lines: string; follow?: boolean; send?: string }, cmd: Command) => {
        const c = client(cmd);
        if (o.send !== undefined) {
          await c.post(`/v1/vms/${enc(name)}/console`, { data: `${o.send}\n` });
          if (!o.follow) return;
        }
        const res = await c.raw('GET', `/v1/vms/${enc(name)}/console?lines=${int(o.lines, '--lines')}&follow=${o.follow ? 1 : 0}`);
        if (!res.ok) {
          const e = (await res.json()) as { code: string; message: string };
          throw new FerryError(e.code as 'VM_NOT_FOUND', e.message);
        }
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) process.stdout.write(chunk);
      }),
    );

  vm.command('guest <name>')
    .description("the guest workload's probes: heartbeats, largest heartbeat gap, last durable write")
    .option('--reset-gap', 'reset the largest-gap measurement')
    .action(
      action(async (name: string, o: { resetGap?: boolean }, cmd: Command) => {
        const c = client(cmd);
        if (o.resetGap) await c.post(`/v1/vms/${enc(name)}/guest/reset-gap`);
        const s = await c.get<Record<string, unknown>>(`/v1/vms/${enc(name)}/guest`);
        if (globals(cmd).json) return printJson(s);
        say(`ready        ${s.ready}`);
        say(`heartbeats   ${s.heartbeats} (last #${s.lastHeartbeat})`);
        say(`max gap      ${formatDuration(Number(s.maxGapMs))}`);
        say(`durable seq  ${s.lastDurableSeq}`);
        if (s.rootLine) say(`root         ${s.rootLine}`);
      }),
    );
}
