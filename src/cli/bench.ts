// Why this file exists: `ferry bench …` commands (the benchmarks live in src/bench/).
import type { Command } from 'commander';
import path from 'node:path';
import { backupTable, benchBackup } from '../bench/backup.js';
import { benchMigrate } from '../bench/migrate.js';
import { benchTransport } from '../bench/transport.js';
import fs from 'node:fs';
import { writeReport, markdownTable } from '../bench/report.js';
import { NATIVE_VARIANTS, type Scenario } from '../bench/scenario.js';
import { FerryError } from '../errors.js';
import { PROFILES, parseRate } from '../lab/profiles.js';
import { parseSize } from '../util/units.js';
import { action, globals, say } from './common.js';
import { printJson } from './output.js';

export function registerBenchCommands(program: Command): void {
  const bench = program.command('bench').description('benchmarks on the WAN lab (results: JSON, markdown table, SVG plot)');
  bench
    .command('backup')
    .description('full and incremental backups and dedup on this host, against qemu-img convert -c of the same disks')
    .option('--disk <size>', 'data disk size', '2G')
    .option('--used <size>', 'data on the data disk', '1G')
    .option('--seed <n>', 'data seed', '1')
    .option('--work-dir <dir>', 'scratch data dir (deleted first)', '/var/tmp/ferry-bench-backup')
    .option('--out <dir>', 'results folder', 'bench-results')
    .action(
      action(async (o: Record<string, string>, cmd: Command) => {
        const g = globals(cmd);
        const r = await benchBackup({ diskBytes: parseSize(o.disk!), usedBytes: parseSize(o.used!), seed: Number(o.seed), workDir: path.resolve(o.workDir!), say: g.json ? () => {} : say });
        const dir = path.join(o.out!, `backup-${r.startedAt.replace(/[:.]/g, '-')}`);
        fs.mkdirSync(dir, { recursive: true });
        fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify(r, null, 2));
        fs.writeFileSync(path.join(dir, 'result.md'), backupTable(r) + '\n');
        if (g.json) printJson(r);
        else say(`\n${backupTable(r)}\n\nresults: ${dir}`);
      }),
    );
  bench
    .command('migrate')
    .description('migrate a VM with its workload across the emulated WAN: QEMU native (libvirt-style) vs Ferry, same link, same run')
    .option('--profile <name>', `link profile: ${Object.keys(PROFILES).join(', ')}`, 'wan-10')
    .option('--vs <what>', 'baseline: native', 'native')
    .option('--native-variants <list>', `native tunings to try, comma-separated, "all" or "none": ${Object.keys(NATIVE_VARIANTS).join(', ')}`, 'multifd-zstd')
    .option('--memory <size>', 'VM memory', '256M')
    .option('--disk <size>', 'data disk size', '512M')
    .option('--used <size>', 'data already on the data disk', '150M')
    .option('--write-rate <rate>', 'guest disk writes per second', '100K')
    .option('--dirty <size>', 'guest RAM rewritten continuously', '16M')
    .option('--heartbeat <hz>', 'guest heartbeat rate: the guest-seen downtime is the largest gap, so it is at least one period', '50')
    .option('--cc <algo>', 'TCP congestion control on both ends: cubic or bbr', 'cubic')
    .option('--seed <n>', 'seed (emulator and data)', '1')
    .option('--timeout <s>', 'per-run limit; a run past it is recorded as failed', '1800')
    .option('--native-suspend-after <s>', "libvirt's virsh migrate --timeout: suspend the guest if native migration has not converged after this long ('none' to never)", '300')
    .option('--out <dir>', 'results folder', 'bench-results')
    .option('--no-ferry', "skip Ferry's own migration (native runs only)")
    .option('--seeded <sec>', "also run Ferry to a destination that holds a backup of the VM taken SEC seconds before the migration")
    .action(
      action(async (o: Record<string, string>, cmd: Command) => {
        if (o.vs !== 'native') throw new FerryError('INVALID_ARGUMENT', '--vs: only "native" is known');
        const variants = o.nativeVariants === 'all' ? Object.keys(NATIVE_VARIANTS) : o.nativeVariants === 'none' ? [] : o.nativeVariants!.split(',');
        for (const v of variants) if (!NATIVE_VARIANTS[v]) throw new FerryError('INVALID_ARGUMENT', `unknown native variant ${v}`);
        if (!(Number(o.heartbeat) >= 1 && Number(o.heartbeat) <= 100)) throw new FerryError('INVALID_ARGUMENT', '--heartbeat: a rate from 1 to 100 Hz');
        if (!PROFILES[o.profile!]) throw new FerryError('INVALID_ARGUMENT', `unknown profile ${o.profile}`);
        const s: Scenario = {
          profile: o.profile!,
          memoryMiB: Math.round(parseSize(o.memory!) / 2 ** 20),
          diskBytes: parseSize(o.disk!),
          usedBytes: parseSize(o.used!),
          writeRate: parseSize(o.writeRate!),
          dirtyMiB: Math.round(parseSize(o.dirty!) / 2 ** 20),
          heartbeatHz: Number(o.heartbeat),
          seed: Number(o.seed),
          cc: o.cc as 'cubic' | 'bbr',
          timeoutSec: Number(o.timeout),
          ...(o.nativeSuspendAfter === 'none' ? {} : { suspendAfterSec: Number(o.nativeSuspendAfter) }),
        };
        const g = globals(cmd);
        const r = await benchMigrate(s, { variants, ferry: (o as Record<string, unknown>).ferry !== false, ...(o.seeded !== undefined ? { seededAfterSec: Number(o.seeded) } : {}), say: g.json ? () => {} : say });
        const dir = path.join(o.out!, `migrate-${s.profile}-${r.startedAt.replace(/[:.]/g, '-')}`);
        const files = writeReport(r, dir);
        if (g.json) printJson({ ...r, files });
        else say(`\n${markdownTable(r)}\n\nresults: ${files.json}, ${files.md}, ${files.svg}`);
        if (r.runs.some((x) => !x.ok)) process.exitCode = 1;
      }),
    );

  bench
    .command('transport')
    .description("push the guest's root disk from h1 to h2 over the emulated link: Ferry's transport vs one plain TCP stream, same run")
    .option('--profile <name>', `link profile: ${Object.keys(PROFILES).join(', ')}`, 'wan-10')
    .option('--size <bytes>', 'how much of the corpus to send', '64M')
    .option('--corpus <kind>', 'root (the guest root disk: realistic) or random (incompressible: measures link use)', 'root')
    .option('--streams <n>', "TCP connections of the Ferry session, or 'auto' (from the measured RTT)", 'auto')
    .option('--cc <algo>', 'TCP congestion control on both ends: cubic or bbr', 'cubic')
    .option('--cut <at:seconds[:flap]>', 'an outage during the transfer, e.g. 10:60 or 10:20:flap')
    .option('--only <mode>', 'ferry or plain (default: both)')
    .option('--bandwidth <rate>', "cap the Ferry session's sending rate, e.g. 5mbit")
    .option('--timeout <s>', 'per-run limit', '1800')
    .option('--out <dir>', 'results folder', 'bench-results')
    .action(
      action(async (o: Record<string, string>, cmd: Command) => {
        if (!(Number(o.heartbeat) >= 1 && Number(o.heartbeat) <= 100)) throw new FerryError('INVALID_ARGUMENT', '--heartbeat: a rate from 1 to 100 Hz');
        if (!PROFILES[o.profile!]) throw new FerryError('INVALID_ARGUMENT', `unknown profile ${o.profile}`);
        let cut: { atSeconds: number; seconds: number; flap: boolean } | null = null;
        if (o.cut) {
          const m = /^(\d+):(\d+)(:flap)?$/.exec(o.cut);
          if (!m) throw new FerryError('INVALID_ARGUMENT', '--cut takes AT:SECONDS or AT:SECONDS:flap');
          cut = { atSeconds: Number(m[1]), seconds: Number(m[2]), flap: !!m[3] };
        }
        if (o.bandwidth) process.env.FERRY_BENCH_RATE = String(parseRate(o.bandwidth) / 8);
        const modes = o.only ? [o.only as 'ferry' | 'plain'] : (['ferry', 'plain'] as const).slice();
        const g = globals(cmd);
        const r = await benchTransport({ corpus: o.corpus === 'random' ? 'random' : 'root', profile: o.profile!, bytes: parseSize(o.size!), streams: o.streams === 'auto' ? 'auto' : Number(o.streams), cc: o.cc as 'cubic' | 'bbr', cut, timeoutSec: Number(o.timeout), modes: [...modes], say: g.json ? () => {} : say });
        const dir = path.join(o.out!, `transport-${o.profile}-${r.startedAt.replace(/[:.]/g, '-')}`);
        fs.mkdirSync(dir, { recursive: true });
        fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify(r, null, 2));
        if (g.json) printJson(r);
        else say(`results: ${path.join(dir, 'result.json')}`);
        if (r.runs.some((x) => !x.ok)) process.exitCode = 1;
      }),
    );
}
