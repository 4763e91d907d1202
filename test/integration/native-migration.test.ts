// QEMU's native migration (the benchmark's baseline) between two lab hosts' agents: it completes
// with the VM running on exactly one host and verified disks; and when the destination cannot
// be reached the migration fails and the VM keeps running at the source.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { MigrationJob } from '../../src/agent/native-migration.js';
import type { VmView } from '../../src/agent/vms.js';
import { runNative } from '../../src/bench/migrate.js';
import { labClient, labDown, labUp, readLab, type LabState } from '../../src/lab/lab.js';
import type { GuestStats } from '../../src/qemu/serial.js';
import { guestImage, waitFor } from './harness.js';

const NAME = 'itnat';
let lab: LabState;
beforeAll(async () => {
  guestImage();
  await labDown(NAME, { force: true });
  lab = await labUp({ name: NAME, base: '10.210', profile: 'lan', scheduleOutage: false });
});
afterAll(async () => {
  await labDown(NAME, { force: true });
});

const scenario = { profile: 'lan', memoryMiB: 192, diskBytes: 128 << 20, usedBytes: 24 << 20, writeRate: 100 * 1024, dirtyMiB: 8, seed: 4, cc: 'cubic' as const, timeoutSec: 300 };

describe('native QEMU migration through the agents', () => {
  it('moves a running VM with its disks; integrity verified; guest gap measured', async () => {
    const r = await runNative(readLab(NAME), scenario, 'multifd-zstd', (m) => console.log(m));
    expect(r.error).toBeUndefined();
    expect(r.ok).toBe(true);
    expect(r.integrity).toMatchObject({ disksEqual: true, recordsOk: true });
    expect(r.integrity!.durableSeq).toBeGreaterThan(0);
    expect(r.guestDowntimeMs).toBeGreaterThan(0);
    expect(r.wireBytesFwd).toBeGreaterThan(scenario.usedBytes / 2);
  });

  it('a destination that cannot be reached fails the migration; the VM keeps running at the source', async () => {
    const [h1, h2] = lab.hosts;
    const src = labClient(h1!);
    await src.post('/v1/vms', { name: 'stay', image: 'ferry-guest', memoryMiB: 128, disks: [{ sizeBytes: 32 << 20 }], workload: { heartbeatHz: 10 } });
    await src.post('/v1/vms/stay/start');
    await waitFor('boot', 120_000, async () => (await src.get<GuestStats>('/v1/vms/stay/guest')).ready || undefined);
    // Nothing listens on these ports at h2: the mirror's NBD connection is refused.
    await src.post('/v1/vms/stay/migrate/native', { host: h2!.wanIp, nbdPort: 10999, migratePort: 4999, tuning: { capabilities: [], parameters: {} }, timeoutMs: 60_000, to: 'h2' });
    const job = await waitFor('the job to end', 90_000, async () => {
      const j = await src.get<MigrationJob>('/v1/vms/stay/migration');
      return j.state === 'running' ? undefined : j;
    });
    expect(job.state).toBe('failed');
    const v = await src.get<VmView>('/v1/vms/stay');
    expect(v.state).toBe('running');
    const before = (await src.get<GuestStats>('/v1/vms/stay/guest')).heartbeats;
    await new Promise((r) => setTimeout(r, 1500));
    expect((await src.get<GuestStats>('/v1/vms/stay/guest')).heartbeats).toBeGreaterThan(before);
    await src.del('/v1/vms/stay?force=true');
  });
});
