// Fault injection around the agent and QEMU: the agent stopped (SIGTERM) or killed (kill -9)
// while a VM runs must re-attach to it, never start a second QEMU, and lose no guest write;
// QEMU killed with -9 must show up as `crashed` with a reason, and start again cleanly.
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VmView } from '../../src/agent/vms.js';
import { checkDisk } from '../../src/image/check-disk.js';
import type { GuestStats } from '../../src/qemu/serial.js';
import { TestAgent, guestImage, waitFor } from './harness.js';

let agent: TestAgent;
let uuid: string;
beforeAll(async () => {
  agent = await TestAgent.create();
  await agent.api.post('/v1/vms', { name: 'steady', image: 'ferry-guest', memoryMiB: 192, disks: [{ sizeBytes: 64 << 20 }], workload: { heartbeatHz: 10, writeRate: 50 * 1024, seed: 5 } });
  const v = await agent.api.post<VmView>('/v1/vms/steady/start');
  uuid = v.uuid;
  await waitFor('guest ready', 120_000, async () => (await agent.api.get<GuestStats>('/v1/vms/steady/guest')).ready || undefined);
});
afterAll(async () => {
  await agent?.destroy();
});

const durable = async () => (await agent.api.get<GuestStats>('/v1/vms/steady/guest')).lastDurableSeq;

describe('agent restart and crashes', () => {
  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    it(`re-attaches after the agent is stopped with ${signal}; the guest never stopped`, async () => {
      const pid = agent.qemuPids(uuid)[0];
      expect(pid).toBeDefined();
      await agent.stop(signal);
      expect(agent.qemuPids(uuid)).toEqual([pid]);
      await agent.start();
      const v = await agent.api.get<VmView>('/v1/vms/steady');
      expect(v.state).toBe('running');
      expect('pid' in v.runtime && v.runtime.pid).toBe(pid);
      // Starting it again is refused: there is exactly one QEMU for the VM.
      const r = agent.cli(['vm', 'start', 'steady']);
      expect(r.code).toBe(5);
      expect(r.stderr).toContain('VM_RUNNING');
      expect(agent.qemuPids(uuid)).toEqual([pid]);
      // The re-attached console keeps measuring.
      const after = await waitFor('heartbeats on the re-attached console', 20_000, async () => {
        const g = await agent.api.get<GuestStats>('/v1/vms/steady/guest');
        return g.heartbeats > 5 && g.lastDurableSeq > 0 ? g : undefined;
      });
      expect(after.lastHeartbeat).toBeGreaterThan(after.heartbeats); // counter kept running across the restart
      const ev = JSON.parse(agent.cli(['--json', 'events', '--vm', 'steady']).stdout) as { kind: string }[];
      expect(ev.at(-1)!.kind).toBe('reattached');
    });
  }

  it('a VM whose QEMU is killed with -9 becomes crashed, with the reason; no acknowledged write is lost', async () => {
    const upto = await waitFor('some durable writes', 30_000, async () => ((await durable()) > 10 ? durable() : undefined));
    const pid = agent.qemuPids(uuid)[0]!;
    process.kill(pid, 'SIGKILL');
    const v = await waitFor('crashed state', 15_000, async () => {
      const x = await agent.api.get<VmView>('/v1/vms/steady');
      return x.state === 'crashed' ? x : undefined;
    });
    expect('reason' in v.runtime && v.runtime.reason).toMatch(/QEMU exited unexpectedly/);
    const check = await checkDisk(guestImage().tool, path.join(agent.dataDir, 'vms/steady/vdb.qcow2'), 5, upto);
    expect(check.output).toMatch(/FERRY-CHECK OK/);
  });

  it('a crashed VM starts again', async () => {
    const r = agent.cli(['vm', 'start', 'steady']);
    expect(r.code).toBe(0);
    expect(agent.qemuPids(uuid)).toHaveLength(1);
  });

  it('a VM whose QEMU died while the agent was down is marked crashed on agent start, not restarted', async () => {
    const pid = agent.qemuPids(uuid)[0]!;
    await agent.stop('SIGKILL');
    process.kill(pid, 'SIGKILL');
    await waitFor('QEMU gone', 10_000, () => agent.qemuPids(uuid).length === 0 || undefined);
    await agent.start();
    const v = await agent.api.get<VmView>('/v1/vms/steady');
    expect(v.state).toBe('crashed');
    expect('reason' in v.runtime && v.runtime.reason).toMatch(/while the agent was not running/);
    expect(agent.qemuPids(uuid)).toEqual([]);
  });

  it('a second agent on the same data dir is refused', async () => {
    const r = agent.cli(['agent', 'run']);
    expect(r.code).toBe(5);
    expect(r.stderr).toContain('AGENT_ALREADY_RUNNING');
  });
});
