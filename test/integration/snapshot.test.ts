// External snapshots of a real running guest: disk-only and with memory, as a tree; revert
// (memory: the guest continues where it was; disk-only: it boots from that disk); delete merges
// the data live; the tree survives an agent crash; bad input is refused and changes nothing.
// After each step the guest's checker finds every durable record. SPECIFICATION.md 39–42.
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SnapshotView } from '../../src/agent/snapshots.js';
import type { VmView } from '../../src/agent/vms.js';
import { checkDisk } from '../../src/image/check-disk.js';
import type { GuestStats } from '../../src/qemu/serial.js';
import { TestAgent, guestImage, sleep, waitFor } from './harness.js';

let agent: TestAgent;
const SEED = 31;
const guest = async () => agent.api.get<GuestStats>('/v1/vms/sn/guest');
const tree = async () => agent.api.get<{ current: string | null; snapshots: SnapshotView[] }>('/v1/vms/sn/snapshots');
const json = <T>(args: string[]): T => {
  const r = agent.cli(['--json', ...args]);
  if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
};
const dataDisk = async () => {
  const v = await agent.api.get<VmView>('/v1/vms/sn');
  const f = v.spec.disks[1]!.file;
  return f.startsWith('/') ? f : path.join(agent.dataDir, 'vms/sn', f);
};

beforeAll(async () => {
  agent = await TestAgent.create();
  await agent.api.post('/v1/vms', { name: 'sn', image: 'ferry-guest', memoryMiB: 192, disks: [{ sizeBytes: 64 << 20 }], workload: { heartbeatHz: 10, writeRate: 50 * 1024, seed: SEED } });
  await agent.api.post('/v1/vms/sn/start');
  await waitFor('guest ready with durable writes', 120_000, async () => ((await guest()).lastDurableSeq > 20 ? true : undefined));
});
afterAll(async () => {
  await agent?.destroy();
});

let hbAtMem = 0;
let uptoA = 0;

describe('snapshots', () => {
  it('disk-only and memory snapshots of a running VM; the guest keeps running', async () => {
    uptoA = (await guest()).lastDurableSeq;
    const a = json<{ pauseMs: number; memory: boolean }>(['snapshot', 'create', 'sn', 'a']);
    expect(a.memory).toBe(false);
    await sleep(2000);
    hbAtMem = (await guest()).lastHeartbeat;
    const b = json<{ pauseMs: number; memory: boolean }>(['snapshot', 'create', 'sn', 'b', '--memory']);
    expect(b.memory).toBe(true);
    console.log(`snapshot pause: disk-only ${a.pauseMs} ms (QMP transaction), with memory ${b.pauseMs} ms`);
    const hb = (await guest()).lastHeartbeat;
    await sleep(1500);
    expect((await guest()).lastHeartbeat).toBeGreaterThan(hb + 5);
    const t = await tree();
    expect(t.current).toBe('b');
    expect(t.snapshots.map((s) => [s.name, s.parent, s.memory])).toEqual([['a', null, false], ['b', 'a', true]]);
  });

  it('the tree survives an agent crash', async () => {
    await agent.stop('SIGKILL');
    await agent.start();
    expect((await tree()).snapshots.map((s) => s.name)).toEqual(['a', 'b']);
    expect(agent.cli(['snapshot', 'list', 'sn']).stdout).toMatch(/a .*\n {2}b \(\+memory\).*<- current/);
  });

  it('revert to a memory snapshot: the guest continues from that moment', async () => {
    await sleep(3000);
    expect((await guest()).lastHeartbeat).toBeGreaterThan(hbAtMem + 30);
    const r = json<{ state: string }>(['snapshot', 'revert', 'sn', 'b']);
    expect(r.state).toBe('running');
    const g = await waitFor('heartbeats after the revert', 30_000, async () => {
      const x = await guest();
      return x.heartbeats > 3 ? x : undefined;
    });
    // The heartbeat counter lives in guest RAM: it resumed near where b was taken, not at 1.
    expect(g.lastHeartbeat).toBeGreaterThan(hbAtMem);
    expect(g.lastHeartbeat).toBeLessThan(hbAtMem + 30 + g.heartbeats);
  });

  it('revert to a disk-only snapshot boots from that disk; a new snapshot branches the tree', async () => {
    json(['snapshot', 'revert', 'sn', 'a']);
    await waitFor('guest ready after the revert', 120_000, async () => ((await guest()).ready ? true : undefined));
    json(['snapshot', 'create', 'sn', 'c']);
    const t = await tree();
    expect(t.snapshots.find((s) => s.name === 'a')!.children.sort()).toEqual(['b', 'c']);
    expect(t.current).toBe('c');
  });

  it('delete merges the data live (into both branches); every durable record is still there', async () => {
    const del = json<{ merged: number }>(['snapshot', 'delete', 'sn', 'a']);
    expect(del.merged).toBe(4); // b's and c's images, two disks each
    const hb = (await guest()).lastHeartbeat;
    await sleep(1500);
    expect((await guest()).lastHeartbeat).toBeGreaterThan(hb + 5);
    expect(json<{ merged: number }>(['snapshot', 'delete', 'sn', 'c']).merged).toBe(2); // the running overlays
    expect((await tree()).snapshots.map((s) => s.name)).toEqual(['b']);
    const upto = (await guest()).lastDurableSeq;
    expect(agent.cli(['vm', 'stop', 'sn', '--timeout', '60']).code).toBe(0);
    const check = await checkDisk(guestImage().tool, await dataDisk(), SEED, upto);
    expect(check.output).toMatch(/FERRY-CHECK OK/);
    expect(uptoA).toBeGreaterThan(0);
  });

  it('bad input is refused and changes nothing', async () => {
    const before = await tree();
    const cases: [string[], string][] = [
      [['snapshot', 'create', 'sn', '../x'], 'INVALID_NAME'],
      [['snapshot', 'create', 'sn', 'b'], 'SNAPSHOT_EXISTS'],
      [['snapshot', 'create', 'sn', 'm', '--memory'], 'VM_NOT_RUNNING'],
      [['snapshot', 'revert', 'sn', 'nope'], 'SNAPSHOT_NOT_FOUND'],
      [['snapshot', 'delete', 'sn', 'nope'], 'SNAPSHOT_NOT_FOUND'],
      [['snapshot', 'list', 'nope'], 'VM_NOT_FOUND'],
    ];
    for (const [args, code] of cases) expect(agent.cli(args).stderr, args.join(' ')).toContain(code);
    expect(await tree()).toEqual(before);
  });
});
