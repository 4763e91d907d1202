// Why this file exists: `ferry demo`, the README's first command. From nothing it installs what
// it needs (Debian packages, the guest image), starts a private agent, boots a VM running the
// guest workload, and shows it working: heartbeats, durable disk writes, a pause measured from
// the guest's side, and the writer's records verified inside the guest and again on the host.
// (The live migration across the emulated WAN joins it with the migration issue.)
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DEFAULT_IMAGES_DIR, GUEST_IMAGE, files } from '../config.js';
import { initAgent } from '../agent/identity.js';
import type { VmView } from '../agent/vms.js';
import { AgentClient } from '../cli/client.js';
import { FerryError } from '../errors.js';
import { buildGuestImage } from '../image/build-guest.js';
import { readImage } from '../image/catalog.js';
import { checkDisk } from '../image/check-disk.js';
import type { GuestStats } from '../qemu/serial.js';
import { setup } from '../setup/packages.js';
import { formatDuration } from '../util/units.js';
import { sleep, waitFor } from '../util/wait.js';

const DEMO_DIR = process.env.FERRY_DEMO_DIR ?? '/tmp/ferry-demo';
const LISTEN = process.env.FERRY_DEMO_LISTEN ?? '127.0.0.1:7451';
const SEED = 7;

export async function runDemo(opts: { keep: boolean; json: boolean }): Promise<void> {
  const say = opts.json ? () => {} : (m: string) => process.stdout.write(`${m}\n`);
  const report: Record<string, unknown> = {};
  say('== Ferry demo: a VM with its workload under a real QEMU ==');
  say('-- step 1: Debian packages');
  await setup({ say: (m) => say(`   ${m}`) });
  say('-- step 2: guest image (built once, cached)');
  const t0 = Date.now();
  await buildGuestImage(DEFAULT_IMAGES_DIR, { say: (m) => say(`   ${m}`) });
  report.imageSeconds = (Date.now() - t0) / 1000;

  say(`-- step 3: a private agent (data dir ${DEMO_DIR}, API ${LISTEN})`);
  fs.rmSync(DEMO_DIR, { recursive: true, force: true });
  await initAgent(DEMO_DIR, { listen: LISTEN, imagesDir: DEFAULT_IMAGES_DIR, hostName: 'demo-host' });
  const agentLog = fs.openSync(path.join(DEMO_DIR, 'agent.log'), 'a');
  const agent: ChildProcess = spawn(process.execPath, [process.argv[1]!, '--data-dir', DEMO_DIR, 'agent', 'run'], {
    stdio: ['ignore', agentLog, agentLog],
    detached: opts.keep,
  });
  const api = new AgentClient({ dataDir: DEMO_DIR });
  const stopAgent = () => {
    if (!opts.keep) agent.kill('SIGTERM');
  };
  try {
    const host = await waitFor('the agent', 60_000, () => api.get<Record<string, unknown>>('/v1/host'));
    say(`   agent up: accelerator ${host.accel} (${host.accelReason}), ${host.qemuVersion}`);
    report.accel = host.accel;

    say('-- step 4: create and start VM "demo" (256 MiB RAM, 256 MiB data disk, workload on)');
    await api.post<VmView>('/v1/vms', {
      name: 'demo',
      memoryMiB: 256,
      image: GUEST_IMAGE,
      disks: [{ sizeBytes: 256 * 1024 ** 2 }],
      workload: { heartbeatHz: 10, writeRate: 100 * 1024, seed: SEED, dirtyMiB: 16 },
    });
    const tStart = Date.now();
    await api.post('/v1/vms/demo/start');
    const ready = await waitFor('the guest to boot', 120_000, async () => {
      const s = await api.get<GuestStats>('/v1/vms/demo/guest');
      return s.ready ? s : undefined;
    });
    report.bootSeconds = (Date.now() - tStart) / 1000;
    say(`   booted to userspace in ${(report.bootSeconds as number).toFixed(1)} s; ${ready.rootLine ?? ''}`);

    say('-- step 5: watch the workload for 8 s (10 Hz heartbeat, 100 KB/s of O_DIRECT writes, 16 MiB RAM dirtier)');
    await api.post('/v1/vms/demo/guest/reset-gap');
    for (let i = 0; i < 8; i++) {
      await sleep(1000);
      const s = await api.get<GuestStats>('/v1/vms/demo/guest');
      say(`   t+${i + 1}s  heartbeats ${String(s.heartbeats).padStart(4)}  durable writes ${String(s.lastDurableSeq).padStart(5)}  largest heartbeat gap ${formatDuration(s.maxGapMs)}`);
    }

    say('-- step 6: pause the VM for 2 s; the guest-side heartbeat gap measures it');
    await api.post('/v1/vms/demo/guest/reset-gap');
    await api.post('/v1/vms/demo/pause');
    await sleep(2000);
    await api.post('/v1/vms/demo/resume');
    await sleep(1000);
    const afterPause = await api.get<GuestStats>('/v1/vms/demo/guest');
    report.pauseGapMs = afterPause.maxGapMs;
    say(`   largest heartbeat gap: ${formatDuration(afterPause.maxGapMs)} (paused for 2.0 s)`);

    say('-- step 7: verify every durable record, inside the guest (typed on its serial console)');
    const upto = afterPause.lastDurableSeq;
    await api.post('/v1/vms/demo/console', { data: `ferry-guest check --dev /dev/vdb --seed ${SEED} --upto ${upto}\n` });
    const line = await waitFor('the in-guest checker', 60_000, async () => {
      const res = await api.raw('GET', '/v1/vms/demo/console?lines=400');
      const text = await res.text();
      return text.split('\n').find((l) => l.startsWith(`FERRY-CHECK`) && l.includes(`upto=${upto}`));
    });
    say(`   guest: ${line.trim()}`);
    report.guestCheck = line.trim();

    say('-- step 8: stop the VM, then verify the same records on the host from its qcow2 data disk');
    await api.post('/v1/vms/demo/stop', { force: true });
    const tool = readImage(DEFAULT_IMAGES_DIR, GUEST_IMAGE).tool;
    const disk = path.join(files(DEMO_DIR).vms, 'demo', 'vdb.qcow2');
    const host2 = await checkDisk(tool, disk, SEED, upto);
    say(`   host: ${host2.output}`);
    report.hostCheck = host2.output;
    if (!host2.ok || !line.includes('OK')) throw new FerryError('INTERNAL', 'demo: integrity check failed');

    const info = await api.get<Record<string, unknown>>('/v1/host');
    report.agentRssBytes = info.memoryRssBytes;
    if (!opts.keep) await api.del('/v1/vms/demo?force=true');
    say('== demo complete ==');
    say(`   boot ${(report.bootSeconds as number).toFixed(1)} s under ${String(report.accel).toUpperCase()}, ${upto} durable writes all verified, pause gap ${formatDuration(afterPause.maxGapMs)}`);
    if (opts.keep) say(`   agent left running: ferry --data-dir ${DEMO_DIR} vm list`);
    if (opts.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  } finally {
    stopAgent();
  }
}
