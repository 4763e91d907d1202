// A real guest through the real agent: create → start → heartbeat and durable writes → pause
// (measured from the guest) → console in and out → graceful stop → every durable record found on
// the disk from the host → restart → delete (--keep-disks keeps them).
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VmView } from '../../src/agent/vms.js';
import { checkDisk } from '../../src/image/check-disk.js';
import type { GuestStats } from '../../src/qemu/serial.js';
import { TestAgent, guestImage, sleep, waitFor } from './harness.js';

let agent: TestAgent;
beforeAll(async () => {
  agent = await TestAgent.create();
});
afterAll(async () => {
  await agent?.destroy();
});

const guest = (name: string) => agent.api.get<GuestStats>(`/v1/vms/${name}/guest`);

describe('VM lifecycle on a real QEMU guest', () => {
  it('reports the accelerator it detected', async () => {
    const h = await agent.api.get<{ accel: string; accelReason: string; images: string[] }>('/v1/host');
    expect(['kvm', 'tcg']).toContain(h.accel);
    expect(h.accelReason.length).toBeGreaterThan(0);
    expect(h.images).toContain('ferry-guest');
  });

  it('creates a VM whose system disk is an overlay on the image template', async () => {
    const r = agent.cli(['--json', 'vm', 'create', 'life', '--memory', '256M', '--disk', '64M', '--heartbeat', '10', '--write-rate', '100K', '--seed', '11', '--dirty', '8M', '--nic', 'user']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const v = JSON.parse(r.stdout) as VmView;
    expect(v.state).toBe('stopped');
    expect(v.spec.disks.map((d) => d.id)).toEqual(['vda', 'vdb']);
    expect(v.spec.disks[0]!.backing).toBe(guestImage().root);
    expect(v.spec.nics).toMatchObject([{ id: 'net0', type: 'user', mac: expect.stringMatching(/^52:54:00:/) }]);
    expect(fs.existsSync(path.join(agent.dataDir, 'vms/life/vda.qcow2'))).toBe(true);
  });

  it('starts it: the guest boots, mounts its Debian root, heartbeats and writes durably', async () => {
    const t0 = Date.now();
    const r = agent.cli(['vm', 'start', 'life']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/state\s+running, QEMU pid \d+/);
    const s = await waitFor('FERRY-READY', 120_000, async () => ((await guest('life')).ready ? guest('life') : undefined));
    console.log(`guest booted to userspace in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    expect(s.rootLine).toMatch(/FERRY-ROOT mounted \/dev\/vda debian=12/);
    const later = await waitFor('heartbeats and writes', 30_000, async () => {
      const g = await guest('life');
      return g.heartbeats >= 20 && g.lastDurableSeq >= 20 ? g : undefined;
    });
    expect(later.lastHeartbeat).toBeGreaterThanOrEqual(20);
  });

  it('pauses and resumes; the guest-side heartbeat gap measures the pause', async () => {
    await agent.api.post('/v1/vms/life/guest/reset-gap');
    expect(agent.cli(['vm', 'pause', 'life']).stdout).toMatch(/state\s+paused/);
    const beforeHb = (await guest('life')).heartbeats;
    await sleep(1500);
    expect((await guest('life')).heartbeats).toBeLessThanOrEqual(beforeHb + 1);
    expect(agent.cli(['vm', 'resume', 'life']).stdout).toMatch(/state\s+running/);
    const g = await waitFor('heartbeats after resume', 20_000, async () => {
      const s = await guest('life');
      return s.heartbeats > beforeHb + 3 ? s : undefined;
    });
    expect(g.maxGapMs).toBeGreaterThanOrEqual(1400);
  });

  it('takes console input and shows the output (the in-guest checker)', async () => {
    const upto = (await guest('life')).lastDurableSeq;
    const r = agent.cli(['vm', 'console', 'life', '--send', `ferry-guest check --dev /dev/vdb --seed 11 --upto ${upto}`]);
    expect(r.code).toBe(0);
    const line = await waitFor('the checker verdict', 60_000, () => {
      const out = agent.cli(['vm', 'console', 'life', '-n', '500']).stdout;
      return out.split('\n').find((l) => l.startsWith('FERRY-CHECK') && l.includes(`upto=${upto}`));
    });
    expect(line).toMatch(/FERRY-CHECK OK/);
    // The user-mode NIC is there for the guest.
    agent.cli(['vm', 'console', 'life', '--send', 'echo NICS=$(ls /sys/class/net | tr "\\n" ,)']);
    const nics = await waitFor('the NIC list', 30_000, () => agent.cli(['vm', 'console', 'life', '-n', '500']).stdout.split('\n').find((l) => l.startsWith('NICS=')));
    expect(nics).toContain('eth0');
  });

  it('stops gracefully (ACPI), and every durable record is on the disk', async () => {
    const upto = (await guest('life')).lastDurableSeq;
    expect(upto).toBeGreaterThan(20);
    const r = agent.cli(['vm', 'stop', 'life', '--timeout', '30']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/state\s+stopped \(stopped by operator \(graceful\)\)/);
    const v = await agent.api.get<VmView>('/v1/vms/life');
    expect(agent.qemuPids(v.uuid)).toEqual([]);
    const check = await checkDisk(guestImage().tool, path.join(agent.dataDir, 'vms/life/vdb.qcow2'), 11, upto);
    expect(check.output).toMatch(/FERRY-CHECK OK/);
    expect(check.ok).toBe(true);
    // The checker is not vacuous: one record past what was written must be reported missing.
    const past = await checkDisk(guestImage().tool, path.join(agent.dataDir, 'vms/life/vdb.qcow2'), 11, upto + 50);
    expect(past.ok).toBe(false);
  });

  it('restarts: stop (forced) then start; the event log tells the story', async () => {
    expect(agent.cli(['vm', 'start', 'life']).code).toBe(0);
    const r = agent.cli(['vm', 'restart', 'life', '--force']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/state\s+running/);
    const v = await agent.api.get<VmView>('/v1/vms/life');
    expect(agent.qemuPids(v.uuid)).toHaveLength(1);
    const ev = JSON.parse(agent.cli(['--json', 'events', '--vm', 'life']).stdout) as { kind: string }[];
    expect(ev.map((e) => e.kind)).toEqual(['created', 'started', 'paused', 'resumed', 'stopped', 'started', 'stopped', 'started']);
  });

  it('deletes with --force --keep-disks: QEMU gone, definition gone, disks kept', async () => {
    const v = await agent.api.get<VmView>('/v1/vms/life');
    const r = agent.cli(['--json', 'vm', 'delete', 'life', '--force', '--keep-disks']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).keptDisks).toHaveLength(2);
    expect(agent.qemuPids(v.uuid)).toEqual([]);
    expect(fs.existsSync(path.join(agent.dataDir, 'vms/life/vdb.qcow2'))).toBe(true);
    expect(agent.cli(['vm', 'show', 'life']).code).toBe(3);
  });

  it('imports a kept disk (inside the data dir) into a new VM', async () => {
    const r = agent.cli(['--json', 'vm', 'create', 'again', '--disk', 'vms/life/vdb.qcow2']);
    expect(r.stderr).toBe('');
    const v = JSON.parse(r.stdout) as VmView;
    expect(v.spec.disks[1]!.file).toBe(path.join(fs.realpathSync(agent.dataDir), 'vms/life/vdb.qcow2'));
    expect(agent.cli(['vm', 'delete', 'again']).code).toBe(0);
    // An imported disk belongs to the operator: deleting the VM leaves it.
    expect(fs.existsSync(path.join(agent.dataDir, 'vms/life/vdb.qcow2'))).toBe(true);
  });
});
