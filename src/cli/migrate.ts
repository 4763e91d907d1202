// Why this file exists: `ferry migrate` — live-migrate a running VM to a trusted host, with a
// progress display (phase, bytes done/total, rate, dirty rates, round, ETA, predicted downtime),
// and `ferry migrate status|cancel|list`. With --json, one JSON object per progress sample
// (newline-delimited) and the final view. All of it is calls to the agent's API.
import type { Command } from 'commander';
import type { AgentClient } from './client.js';
import type { MigrationView } from '../migration/source.js';
import { FerryError } from '../errors.js';
import { formatBytes, formatDuration, parseRate } from '../util/units.js';
import { sleep } from '../util/wait.js';
import { action, client, globals, say } from './common.js';
import { printJson, table } from './output.js';

const SUBCOMMANDS = ['status', 'cancel', 'list'];

function rate(bps: number): string {
  return `${((bps * 8) / 1e6).toFixed(1)} Mbit/s`;
}

function bar(frac: number, width = 24): string {
  const n = Math.max(0, Math.min(width, Math.round(frac * width)));
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}]`;
}

/** One progress line for people. */
export function progressLine(v: MigrationView): string {
  const el = formatDuration(((v.endedAt ?? Date.now()) - v.startedAt));
  const eta = v.etaSec !== null && v.etaSec !== undefined ? ` ETA ${formatDuration(v.etaSec * 1000)}` : '';
  const pd = v.predictedDowntimeMs ? ` pause≈${v.predictedDowntimeMs} ms` : '';
  const wire = ` wire ${formatBytes(v.wire.sentBytes)} @ ${rate(v.wire.drainBytesPerSec)}`;
  const thr = v.ioThrottleBps ? ` io-throttle ${formatBytes(v.ioThrottleBps)}/s` : '';
  const stall = v.wire.connections === 0 && v.phase !== 'begin' ? ' LINK DOWN (waiting)' : '';
  switch (v.phase) {
    case 'disk': {
      const d = v.disk;
      const frac = d.roundTotal ? d.roundDone / d.roundTotal : 0;
      return `${el} disk round ${d.round} ${bar(frac)} ${formatBytes(d.roundDone)}/${formatBytes(d.roundTotal)}, dirty ${d.round === 0 ? '– (measured after round 0)' : `${formatBytes(d.dirtyRate)}/s`}${wire}${thr}${eta}${stall}`;
    }
    case 'ram': {
      const r = v.ram;
      const frac = r && r.total ? 1 - r.remaining / r.total : 0;
      return `${el} ram ${bar(frac)} remaining ${formatBytes(r?.remaining ?? 0)}, dirty ${!r?.dirtyBytesPerSec && r && r.transferred < r.total ? '– (measured after the first pass)' : `${formatBytes(r?.dirtyBytesPerSec ?? 0)}/s`}${r?.cpuThrottle ? ` cpu-throttle ${r.cpuThrottle}%` : ''}, disk round ${v.disk.round}${wire}${thr}${pd}${eta}${stall}`;
    }
    default:
      if (v.files && v.phase === 'begin') return `${el} snapshot files ${bar(v.files.total ? v.files.done / v.files.total : 1)} ${formatBytes(v.files.done)}/${formatBytes(v.files.total)}${wire}${stall}`;
      return `${el} ${v.phase}${wire}${stall}`;
  }
}

function summary(v: MigrationView): string {
  const lines = [`migration ${v.id.slice(0, 8)}: ${v.vm} → ${v.to}: ${v.phase}${v.error ? ` — error [${v.error.code}]: ${v.error.message}` : ''}`];
  if (v.result) {
    lines.push(`  total ${formatDuration(v.result.totalMs)}, guest paused ${v.result.pausedMs} ms (switchover to running on ${v.to})${v.result.qemuDowntimeMs !== undefined ? `, QEMU-reported downtime ${v.result.qemuDowntimeMs} ms` : ''}`);
  }
  const sw = v.result?.switchover;
  if (sw) lines.push(`  switchover (ms after the pause): final disk delta ${formatBytes(sw.finalDiskBytes ?? 0)} read by ${sw.finalDiskReadMs}, continue ${sw.continuedMs}; destination: final received ${sw.destFinalMs}, disk verified ${sw.destDiskVerifiedMs}, RAM loaded ${sw.destRamCompletedMs}, RAM checked ${sw.destRamCheckedMs}${sw.ramRepairedMiB ? ` (${sw.ramRepairedMiB} MiB differed and were repaired from the source)` : ''}, running ${sw.destRunningMs}`);
  lines.push(`  disk: ${formatBytes(v.disk.sentBytes)} read and sent in ${v.disk.round + 1} round(s), ${formatBytes(v.disk.zeroBytes)} zeroes elided, ${formatBytes(v.disk.verifiedBytes)} verified, ${v.disk.mismatches} mismatch(es) re-sent`);
  if (v.verify) lines.push(`  verify (${v.verify.mode}): ${v.verify.groups} group hashes compared, ${v.verify.differing} differing re-sent`);
  if (v.ram) lines.push(`  ram: ${formatBytes(v.ram.streamBytes)} of QEMU stream${v.ram.encodedBytes ? `, ${formatBytes(v.ram.encodedBytes)} after the page-delta codec (before compression)` : ''}`);
  lines.push(`  wire: ${formatBytes(v.wire.sentBytes)} sent, ${v.wire.refFrames} blocks sent as references to content the destination held, ${v.wire.resentFrames + (v.wire.rescuedFrames ?? 0)} frames re-sent, ${v.wire.stalls} stall(s), link ${rate(v.wire.linkBytesPerSec)}`);
  if (v.note) lines.push(`  note: ${v.note}`);
  return lines.join('\n');
}

/** Polls a migration until it ends, printing progress; returns the final view. */
export async function follow(api: AgentClient, id: string, o: { json: boolean; quiet?: boolean }): Promise<MigrationView> {
  const tty = process.stdout.isTTY && !o.json;
  let lastPrint = 0;
  for (;;) {
    const v = await api.get<MigrationView>(`/v1/migrations/${id}`);
    if (o.json) process.stdout.write(JSON.stringify(v) + '\n');
    else if (!o.quiet && v.disk) {
      const line = progressLine(v);
      if (tty) process.stdout.write(`\r\x1b[K${line}`);
      else if (Date.now() - lastPrint > 5000) {
        lastPrint = Date.now();
        say(line);
      }
    }
    if (v.endedAt || !v.disk) {
      if (tty) process.stdout.write('\n');
      return v;
    }
    await sleep(o.json ? 1000 : 500);
  }
}

export function registerMigrateCommands(program: Command): void {
  program
    .command('migrate')
    .description('live-migrate a running VM (RAM, devices and local disks) to a trusted host; or: migrate status|cancel|list')
    .argument('<vm|status|cancel|list>', 'the VM to migrate, or a subcommand')
    .argument('[id]', 'for status/cancel: migration id (or prefix) or VM name')
    .option('--to <host>', 'destination: a trusted host name (see `ferry host trusted`)')
    .option('--bandwidth <rate>', 'cap the migration\'s wire rate: 10Mbit, 2M (bytes/s); default none')
    .option('--max-downtime <ms>', 'the guest pause the switchover may cost', '300')
    .option('--timeout <sec>', 'give up (and roll back) after this long; link outages within it are waited out', '3600')
    .option('--verify <mode>', 'full: hash-compare every block before the switchover; sample: a random 5 %', 'full')
    .option('--xbzrle', "let QEMU delta-encode re-sent RAM pages (off: under TCG it corrupted guest memory here, see docs/benchmarks.md)")
    .option('--keep-source', 'keep the VM defined (stopped) here with its disks after the move, as libvirt does')
    .option('--detach', 'start it and return; follow with `ferry migrate status`')
    .addHelpText('after', `
Examples:
  ferry migrate web --to h2                  move VM "web" to trusted host h2, showing progress
  ferry migrate web --to h2 --bandwidth 50Mbit --max-downtime 500
  ferry migrate status web                   the latest migration of "web" (or an id)
  ferry migrate cancel web                   cancel before the switchover (the VM keeps running here)
  ferry migrate list`)
    .action(
      action(async (what: string, id: string | undefined, o: { to?: string; bandwidth?: string; maxDowntime: string; timeout: string; verify: string; xbzrle?: boolean; keepSource?: boolean; detach?: boolean }, cmd: Command) => {
        const g = globals(cmd);
        const api = client(cmd);
        if (what === 'list') {
          const rows = await api.get<{ id: string; vm: string; role: string; peer: string; phase: string; updatedAt: number }[]>('/v1/migrations');
          if (g.json) return printJson(rows);
          return void say(table(rows.map((r) => ({ ...r, id: r.id.slice(0, 8), updated: new Date(r.updatedAt).toISOString() })), ['id', 'vm', 'role', 'peer', 'phase', 'updated']));
        }
        if (what === 'status' || what === 'cancel') {
          if (!id) throw new FerryError('INVALID_ARGUMENT', `migrate ${what}: give a migration id or VM name`);
          if (what === 'cancel') {
            const v = await api.post<MigrationView>(`/v1/migrations/${encodeURIComponent(id)}/cancel`);
            if (g.json) return printJson(v);
            return void say(`cancelling migration ${v.id.slice(0, 8)} of ${v.vm}: it rolls back, the VM keeps running here`);
          }
          const v = await api.get<MigrationView & { phase: string }>(`/v1/migrations/${encodeURIComponent(id)}`);
          if (g.json) return printJson(v);
          return void say(v.disk ? `${summary(v)}\n  now: ${progressLine(v)}` : JSON.stringify(v, null, 2));
        }
        if (SUBCOMMANDS.includes(what)) return;
        if (!o.to) throw new FerryError('INVALID_ARGUMENT', 'migrate: --to HOST is required (a trusted host: `ferry host trusted`)');
        const maxDowntimeMs = Number(o.maxDowntime);
        const timeoutSec = Number(o.timeout);
        const body = {
          to: o.to,
          bandwidth: o.bandwidth ? parseRate(o.bandwidth, '--bandwidth') : 0,
          maxDowntimeMs,
          timeoutSec,
          verify: o.verify,
          xbzrle: !!o.xbzrle,
          keepSource: !!o.keepSource,
        };
        const started = await api.post<MigrationView>(`/v1/vms/${encodeURIComponent(what)}/migrate`, body);
        if (o.detach) {
          if (g.json) return printJson(started);
          return void say(`migration ${started.id} of ${what} to ${o.to} started; follow it with: ferry migrate status ${started.id.slice(0, 8)}`);
        }
        if (!g.json) say(`migrating ${what} to ${o.to} (migration ${started.id.slice(0, 8)}; max downtime ${maxDowntimeMs} ms, verify ${o.verify})`);
        const v = await follow(api, started.id, { json: !!g.json });
        if (!g.json) say(summary(v));
        if (v.phase !== 'done') {
          const code = (v.error?.code ?? 'MIGRATION_FAILED') as ConstructorParameters<typeof FerryError>[0];
          throw new FerryError(code, v.error?.message ?? `migration ended in phase ${v.phase}`);
        }
      }),
    );
}
