#!/usr/bin/env node
// Why this file exists: the `ferry` command line. Each subcommand is a thin shell over the
// agent's HTTP API (vm, host, events) or a local operation (setup, image, agent, demo). Global
// flags: --data-dir, --host, --token, --json. Exit status: 0, or the error code's exit number
// (docs/errors.md).
import { Command, Option } from 'commander';
import { DEFAULT_DATA_DIR, DEFAULT_IMAGES_DIR, GUEST_IMAGE, readConfig } from '../config.js';
import { buildGuestImage } from '../image/build-guest.js';
import { listImages, readImage } from '../image/catalog.js';
import { checkDisk } from '../image/check-disk.js';
import { initAgent } from '../agent/identity.js';
import { runAgent } from '../agent/run.js';
import { setup } from '../setup/packages.js';
import { formatBytes } from '../util/units.js';
import { action, client, globals, say, type Globals } from './common.js';
import { fail, printJson, table } from './output.js';
import { registerBackupCommands } from './backup.js';
import { registerBenchCommands } from './bench.js';
import { registerLabCommands } from './lab.js';
import { registerMigrateCommands } from './migrate.js';
import { registerSnapshotCommands } from './snapshot.js';
import { registerVmCommands } from './vm.js';


function imagesDir(g: Globals, flag?: string): string {
  if (flag) return flag;
  try {
    return readConfig(g.dataDir).imagesDir;
  } catch {
    return DEFAULT_IMAGES_DIR;
  }
}

const program = new Command('ferry')
  .description('Ferry: run QEMU VMs and move them live across slow, lossy WAN links')
  .version('0.1.0')
  .addOption(new Option('--data-dir <dir>', 'agent data directory').default(DEFAULT_DATA_DIR).env('FERRY_DATA_DIR'))
  .option('--host <url>', 'agent API URL (default: the local agent, from the data dir)')
  .option('--token <token>', 'API token (default: the data dir token file, or FERRY_TOKEN)')
  .option('--json', 'machine-readable JSON output')
  .showHelpAfterError();

program
  .command('setup')
  .description('install the Debian packages Ferry needs (idempotent; root installs, others get the command to run)')
  .option('--check', 'only check; exit non-zero if anything is missing')
  .action(
    action(async (o: { check?: boolean }) => {
      const r = await setup({ say, checkOnly: !!o.check });
      if (globals(program).json) printJson(r);
    }),
  );

const image = program.command('image').description('guest images');
image
  .command('build-guest')
  .description("build Ferry's test guest from Debian packages (kernel, busybox initramfs, debootstrap root disk); cached")
  .option('--images-dir <dir>', 'where images live (default: the agent config, else /var/cache/ferry/images)')
  .option('--force', 'rebuild even if up to date')
  .action(
    action(async (o: { imagesDir?: string; force?: boolean }, cmd: Command) => {
      const g = globals(cmd);
      const t0 = Date.now();
      const r = await buildGuestImage(imagesDir(g, o.imagesDir), { force: !!o.force, say: g.json ? () => {} : say });
      if (g.json) printJson({ ...r, seconds: (Date.now() - t0) / 1000 });
      else if (r.rebuilt) say(`done in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    }),
  );
image
  .command('list')
  .description('list guest images')
  .option('--images-dir <dir>', 'images directory')
  .action(
    action((o: { imagesDir?: string }, cmd: Command) => {
      const g = globals(cmd);
      const list = listImages(imagesDir(g, o.imagesDir));
      if (g.json) return printJson(list);
      say(table(list.map((m) => ({ name: m.name, kernel: m.kernelPackage, root: formatBytes(m.rootSizeBytes), built: m.builtAt })), ['name', 'kernel', 'root', 'built']));
    }),
  );
image
  .command('check-disk <file>')
  .description("verify the guest disk writer's records on a disk image (qcow2 or raw)")
  .requiredOption('--seed <n>', 'the writer seed')
  .requiredOption('--upto <seq>', 'every record up to this durable sequence number must be intact')
  .option('--images-dir <dir>', 'images directory')
  .action(
    action(async (file: string, o: { seed: string; upto: string; imagesDir?: string }, cmd: Command) => {
      const g = globals(cmd);
      const tool = readImage(imagesDir(g, o.imagesDir), GUEST_IMAGE).tool;
      const r = await checkDisk(tool, file, Number(o.seed), Number(o.upto));
      if (g.json) printJson(r);
      else say(r.output);
      if (!r.ok) process.exitCode = 1;
    }),
  );

const agent = program.command('agent').description('the host agent');
agent
  .command('init')
  .description('create the data dir, host identity (key + certificate) and API token; idempotent')
  .option('--listen <host:port>', 'API listen address', '127.0.0.1:7450')
  .option('--images-dir <dir>', 'guest images directory', DEFAULT_IMAGES_DIR)
  .option('--host-name <name>', 'host name (default: hostname)')
  .option('--transport-listen <host:port>', 'where peers connect for migrations (default 0.0.0.0:7451)')
  .action(
    action(async (o: { listen: string; imagesDir: string; hostName?: string; transportListen?: string }, cmd: Command) => {
      const g = globals(cmd);
      const r = await initAgent(g.dataDir, { listen: o.listen, imagesDir: o.imagesDir, ...(o.hostName ? { hostName: o.hostName } : {}), ...(o.transportListen ? { transportListen: o.transportListen } : {}) });
      if (g.json) return printJson(r);
      say(`${r.created ? 'initialized' : 'already initialized'}: ${r.dataDir}`);
      say(`host ${r.config.hostName}, API on ${r.config.listen}, images in ${r.config.imagesDir}`);
      say(`fingerprint ${r.fingerprint}`);
    }),
  );
agent
  .command('run')
  .description('run the agent in the foreground (VMs keep running when it stops)')
  .option('--listen <host:port>', 'override the configured API listen address')
  .action(
    action(async (o: { listen?: string }, cmd: Command) => {
      await runAgent(globals(cmd).dataDir, o.listen ? { listen: o.listen } : {});
      // Shut down: VMs keep running; nothing of this process may linger (peer sessions, timers).
      process.exit(0);
    }),
  );

const host = program.command('host').description('this host, and the hosts it trusts');
host
  .command('trust <name> <url>')
  .description("pin a peer host's certificate fingerprint (like ssh's known_hosts); transport connections to or from any other certificate are refused")
  .requiredOption('--fingerprint <sha256>', "the peer's fingerprint, as its `ferry host info` shows it")
  .action(
    action(async (name: string, url: string, o: { fingerprint: string }, cmd: Command) => {
      const { trustHost } = await import('../transport/tls.js');
      const e = trustHost(globals(cmd).dataDir, { name, url, fingerprint: o.fingerprint });
      if (globals(cmd).json) printJson(e);
      else say(`trusted ${e.name} (${e.url}) ${e.fingerprint}`);
    }),
  );
host
  .command('untrust <name>')
  .description('forget a pinned peer host: its connections are refused from now on')
  .action(
    action(async (name: string, _o: unknown, cmd: Command) => {
      const { untrustHost } = await import('../transport/tls.js');
      untrustHost(globals(cmd).dataDir, name);
      if (!globals(cmd).json) say(`no longer trusting ${name}`);
    }),
  );
host
  .command('trusted')
  .description('list pinned peer hosts')
  .action(
    action(async (_o: unknown, cmd: Command) => {
      const { readTrust } = await import('../transport/tls.js');
      const list = readTrust(globals(cmd).dataDir);
      if (globals(cmd).json) printJson(list);
      else say(table(list.map((x) => ({ ...x })), ['name', 'url', 'fingerprint', 'addedAt']));
    }),
  );
host
  .command('info')
  .description('show the agent host: accelerator (KVM/TCG), versions, identity')
  .action(
    action(async (_o: unknown, cmd: Command) => {
      const h = await client(cmd).get<Record<string, unknown>>('/v1/host');
      if (globals(cmd).json) return printJson(h);
      for (const k of ['hostName', 'version', 'accel', 'accelReason', 'qemuVersion', 'dataDir', 'imagesDir', 'fingerprint', 'pid', 'vms', 'images']) {
        say(`${k.padEnd(12)} ${Array.isArray(h[k]) ? (h[k] as string[]).join(', ') : String(h[k])}`);
      }
      say(`${'memory'.padEnd(12)} ${formatBytes(Number(h.memoryRssBytes))} RSS`);
    }),
  );

program
  .command('events')
  .description('the agent event log')
  .option('--vm <name>', 'only this VM')
  .option('--limit <n>', 'how many', '50')
  .action(
    action(async (o: { vm?: string; limit: string }, cmd: Command) => {
      const q = new URLSearchParams({ limit: o.limit, ...(o.vm ? { vm: o.vm } : {}) });
      const ev = await client(cmd).get<{ ts: number; vm: string | null; kind: string; message: string }[]>(`/v1/events?${q}`);
      if (globals(cmd).json) return printJson(ev);
      say(table(ev.map((e) => ({ time: new Date(e.ts).toISOString(), vm: e.vm ?? '-', kind: e.kind, message: e.message })), ['time', 'vm', 'kind', 'message']));
    }),
  );

registerVmCommands(program);
registerMigrateCommands(program);
registerBackupCommands(program);
registerSnapshotCommands(program);
registerLabCommands(program);
registerBenchCommands(program);

program
  .command('demo')
  .description('the demo: a two-host WAN lab (10 Mbit/s, 100 ms RTT, 1 % loss), a VM with its workload, migrated live from h1 to h2 with a report')
  .option('--keep', 'leave the demo lab (and the migrated VM) up')
  .action(
    action(async (o: { keep?: boolean }, cmd: Command) => {
      const { runDemo } = await import('../demo/demo.js');
      await runDemo({ keep: !!o.keep, json: !!globals(cmd).json });
    }),
  );

program.parseAsync(process.argv).catch((e) => fail(e, process.argv.includes('--json')));
