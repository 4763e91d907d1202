// Backups of a real running guest into real chunk stores, through the real CLI and agent:
// full → incremental → restore → boot → the guest's checker finds every durable record; the
// persistent bitmap survives a VM restart and an agent crash; kill -9 mid-backup, a full store
// disk, a corrupted chunk and a wrong key each give a clear error and leave earlier backups
// intact. SPECIFICATION.md promises 32–38 name these tests.
import crypto from 'node:crypto';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { JobView } from '../../src/agent/jobs.js';
import type { VmView } from '../../src/agent/vms.js';
import { checkDisk } from '../../src/image/check-disk.js';
import type { GuestStats } from '../../src/qemu/serial.js';
import { TestAgent, guestImage, waitFor } from './harness.js';

let agent: TestAgent;
const SEED = 21;
const guest = async (vm: string) => agent.api.get<GuestStats>(`/v1/vms/${vm}/guest`);
const json = <T>(args: string[]): T => {
  const r = agent.cli(['--json', ...args]);
  if (r.code !== 0) throw new Error(`ferry ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
};
interface Result { id: string; kind: string; bytesRead: number; bytesNew: number; fullReason?: string }
/** Runs a shell command in the guest (serial console) and waits for it to finish. */
const guestRun = async (cmd: string) => {
  const marker = `DONE-${Date.now()}`;
  agent.cli(['vm', 'console', 'bk', '--send', `${cmd}; echo ${marker}`]);
  await waitFor(cmd, 120_000, () => agent.cli(['vm', 'console', 'bk', '-n', '40']).stdout.split('\n').some((l) => l.trim() === marker) || undefined);
};

beforeAll(async () => {
  agent = await TestAgent.create();
  await agent.api.post('/v1/vms', { name: 'bk', image: 'ferry-guest', memoryMiB: 192, disks: [{ sizeBytes: 128 << 20 }, { sizeBytes: 128 << 20 }], workload: { heartbeatHz: 10, writeRate: 50 * 1024, seed: SEED } });
  await agent.api.post('/v1/vms/bk/start');
  await waitFor('guest ready with durable writes', 120_000, async () => ((await guest('bk')).lastDurableSeq > 20 ? true : undefined));
});
afterAll(async () => {
  spawnSync('umount', ['-l', path.join(agent?.dataDir ?? '/nonexistent', 'small')]);
  await agent?.destroy();
});

let full: Result;
let incr: Result;
let upto = 0;

describe('backups', () => {
  it('a full backup, then an incremental that reads only what changed', async () => {
    full = json<Result>(['backup', 'create', 'bk']);
    expect(full.kind).toBe('full');
    json<Result>(['backup', 'create', 'bk']); // what the guest wrote during the full
    const seq0 = (await guest('bk')).lastDurableSeq;
    // A 1 % change on the scratch disk (vdc; the writer owns vdb).
    const change = Math.round(full.bytesRead / 100 / 65536) * 65536;
    await guestRun(`dd if=/dev/urandom of=/dev/vdc bs=64K count=${change / 65536} seek=100 oflag=direct status=none`);
    upto = (await guest('bk')).lastDurableSeq; // durable before the next backup's instant
    incr = json<Result>(['backup', 'create', 'bk']);
    expect(incr.kind).toBe('incremental');
    // The change, plus one 64 KiB chunk per 4 KiB record the guest's writer made meanwhile.
    const records = (await guest('bk')).lastDurableSeq - seq0 + 16;
    expect(incr.bytesRead).toBeGreaterThanOrEqual(change);
    expect(incr.bytesRead).toBeLessThan(change + records * 65536 + (1 << 20));
    expect(incr.bytesNew).toBeLessThan(change + records * 65536 + (1 << 20));
    const list = json<{ id: string; kind: string }[]>(['backup', 'list', 'bk']);
    expect(list.map((b) => b.kind)).toEqual(['full', 'incremental', 'incremental']);
    expect(json<{ ok: boolean }>(['backup', 'verify', incr.id]).ok).toBe(true);
  });

  it('restore to a new VM → boot → the guest checker finds every durable record', async () => {
    const r = agent.cli(['backup', 'restore', incr.id, '--name', 'bk-restored']);
    expect(r.code, r.stderr).toBe(0);
    const v = await agent.api.get<VmView>('/v1/vms/bk-restored');
    expect(v.state).toBe('stopped');
    // The guest's checker, run on the restored image before it boots: every record durable
    // before the backup's instant is there.
    const host = await checkDisk(guestImage().tool, path.join(agent.dataDir, 'vms/bk-restored/vdb.qcow2'), SEED, upto);
    expect(host.output).toMatch(/FERRY-CHECK OK/);
    // It boots from the restored system disk and its workload writes again. (Its writer starts
    // over at record 1 with the same seed, so from here the in-guest checker checks its new
    // records: the old ones are being overwritten in a different order.)
    await agent.api.post('/v1/vms/bk-restored/start');
    const g = await waitFor('restored guest ready and writing', 120_000, async () => {
      const x = await guest('bk-restored');
      return x.ready && x.lastDurableSeq > 5 ? x : undefined;
    });
    expect(g.rootLine).toMatch(/FERRY-ROOT mounted \/dev\/vda/);
    agent.cli(['vm', 'console', 'bk-restored', '--send', `ferry-guest check --dev /dev/vdb --seed ${SEED} --upto ${g.lastDurableSeq}`]);
    const line = await waitFor('the in-guest checker', 60_000, () => agent.cli(['vm', 'console', 'bk-restored', '-n', '500']).stdout.split('\n').find((l) => l.startsWith('FERRY-CHECK') && l.includes(`upto=${g.lastDurableSeq}`)));
    expect(line).toMatch(/FERRY-CHECK OK/);
    // export: the same disk as a raw file holds the same records
    const raw = path.join(agent.dataDir, 'export.raw');
    expect(agent.cli(['backup', 'export', incr.id, '--disk', '1', '--format', 'raw', '--output', raw]).code).toBe(0);
    expect(fs.statSync(raw).size).toBe(128 << 20);
    const ex = spawnSync(guestImage().tool, ['check', '--dev', raw, '--seed', String(SEED), '--upto', String(upto)], { encoding: 'utf8' });
    expect(ex.stdout + ex.stderr).toMatch(/FERRY-CHECK OK/);
  });

  it('restore in place needs the VM stopped; then it replaces the disks', async () => {
    const upto2 = (await guest('bk-restored')).lastDurableSeq;
    const r = json<Result>(['backup', 'create', 'bk-restored']);
    const running = agent.cli(['backup', 'restore', r.id, '--in-place']);
    expect(running.code).toBe(5);
    expect(running.stderr).toContain('VM_RUNNING');
    expect(agent.cli(['backup', 'restore', r.id, '--in-place', '--name', 'x']).stderr).toContain('INVALID_ARGUMENT');
    expect(agent.cli(['vm', 'stop', 'bk-restored', '--force']).code).toBe(0);
    const ok = agent.cli(['backup', 'restore', r.id, '--in-place']);
    expect(ok.code, ok.stderr).toBe(0);
    const check = await checkDisk(guestImage().tool, path.join(agent.dataDir, 'vms/bk-restored/vdb.qcow2'), SEED, upto2);
    expect(check.output).toMatch(/FERRY-CHECK OK/);
    expect(agent.cli(['vm', 'start', 'bk-restored']).code).toBe(0);
    await waitFor('the guest restored in place boots', 120_000, async () => ((await guest('bk-restored')).ready ? true : undefined));
    expect(agent.cli(['vm', 'stop', 'bk-restored', '--force']).code).toBe(0);
  });

  it('the dirty bitmap survives a VM restart and an agent crash (the next backup is incremental)', async () => {
    expect(agent.cli(['vm', 'stop', 'bk', '--timeout', '60']).code).toBe(0);
    expect(agent.cli(['vm', 'start', 'bk']).code).toBe(0);
    await waitFor('guest ready', 120_000, async () => ((await guest('bk')).ready ? true : undefined));
    expect(json<Result>(['backup', 'create', 'bk']).kind).toBe('incremental');
    await agent.stop('SIGKILL');
    await agent.start();
    expect(json<Result>(['backup', 'create', 'bk']).kind).toBe('incremental');
  });

  it('kill -9 of the agent mid-backup leaves a usable store and the earlier backups intact', async () => {
    const before = json<{ id: string }[]>(['backup', 'list', 'bk']).map((b) => b.id);
    const j = await agent.api.post<JobView>('/v1/vms/bk/backups', { full: true });
    await waitFor('the backup under way', 30_000, async () => ((await agent.api.get<JobView>(`/v1/jobs/${j.id}`)).progress.doneBytes > 0 ? true : undefined));
    await agent.stop('SIGKILL');
    await agent.start();
    expect(json<{ id: string }[]>(['backup', 'list', 'bk']).map((b) => b.id)).toEqual(before);
    expect(json<{ ok: boolean }>(['store', 'verify']).ok).toBe(true);
    const next = json<Result>(['backup', 'create', 'bk']); // the lock of the dead writer is taken over
    expect(next.kind).toBe('full'); // the interrupted --full backup had dropped the bitmap
    expect(next.fullReason).toBeDefined();
    expect(json<{ orphans: number }>(['store', 'gc']).orphans).toBe(0); // its files were already swept
  });

  it('a wrong or missing key gives STORE_WRONG_KEY and writes nothing', () => {
    const dir = path.join(agent.dataDir, 'enc');
    const key = path.join(agent.dataDir, 'enc.key');
    expect(agent.cli(['store', 'init', dir, '--key-file', key]).code).toBe(0);
    const wrong = path.join(agent.dataDir, 'wrong.key');
    fs.writeFileSync(wrong, crypto.randomBytes(32).toString('hex'));
    for (const extra of [['--key-file', wrong], []]) {
      const r = agent.cli(['backup', 'create', 'bk', '--store', dir, ...extra]);
      expect(r.code).toBe(4);
      expect(r.stderr).toContain('STORE_WRONG_KEY');
    }
    const ok = json<Result>(['backup', 'create', 'bk', '--store', dir, '--key-file', key]);
    expect(ok.kind).toBe('full');
    expect(json<{ backups: number; encrypted: boolean }>(['store', 'info', dir, '--key-file', key])).toMatchObject({ backups: 1, encrypted: true });
  });

  it('a store whose disk fills up: STORE_FULL, nothing committed, the earlier backup intact', async () => {
    const small = path.join(agent.dataDir, 'small');
    fs.mkdirSync(small);
    expect(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=100m', 'tmpfs', small]).status).toBe(0);
    const dir = path.join(small, 'store');
    expect(agent.cli(['store', 'init', dir]).code).toBe(0);
    const first = json<Result>(['backup', 'create', 'bk', '--store', dir]);
    // 60 MiB the store cannot compress or dedup, on the scratch disk
    await guestRun('dd if=/dev/urandom of=/dev/vdc bs=1M count=60 seek=20 oflag=direct status=none');
    const r = agent.cli(['backup', 'create', 'bk', '--store', dir]);
    expect(r.code).toBe(6);
    expect(r.stderr).toContain('STORE_FULL');
    expect(json<{ id: string }[]>(['backup', 'list', '--store', dir]).map((b) => b.id)).toEqual([first.id]);
    expect(json<{ ok: boolean }>(['store', 'verify', dir]).ok).toBe(true);
  });

  it('verify names a corrupted chunk and the backups that need it', () => {
    const store = path.join(agent.dataDir, 'store');
    // Backups pack their chunks (packs/<r>.pack): flip a byte inside one packed chunk.
    const db = new Database(path.join(store, 'index.db'), { readonly: true });
    const victim = db.prepare('SELECT id, stored, pack, off FROM chunks WHERE pack IS NOT NULL ORDER BY id LIMIT 1').get() as { id: Buffer; stored: number; pack: string; off: number };
    db.close();
    const file = path.join(store, 'packs', victim.pack);
    const b = fs.readFileSync(file);
    b[victim.off + victim.stored - 3]! ^= 0x55;
    fs.writeFileSync(file, b);
    const r = agent.cli(['store', 'verify']);
    expect(r.code).toBe(6);
    expect(r.stdout).toContain(victim.id.toString('hex'));
    expect(r.stderr).toContain('STORE_CORRUPT');
  });

  it('bad input changes nothing: unknown VM, stopped VM, unknown backup, bad options', () => {
    expect(agent.cli(['backup', 'create', 'nope']).stderr).toContain('VM_NOT_FOUND');
    expect(agent.cli(['backup', 'create', 'bk-restored']).stderr).toContain('VM_NOT_RUNNING');
    expect(agent.cli(['backup', 'show', 'zzzz']).stderr).toContain('BACKUP_NOT_FOUND');
    expect(agent.cli(['backup', 'prune', 'bk']).stderr).toContain('INVALID_ARGUMENT');
    expect(agent.cli(['backup', 'create', 'bk', '--store', '/nonexistent/store']).stderr).toContain('STORE_NOT_FOUND');
  });

  it('prune keeps what the policy says and gc frees the rest', () => {
    const before = json<{ id: string }[]>(['backup', 'list', 'bk']).length;
    const r = json<{ kept: string[]; removed: string[] }>(['backup', 'prune', 'bk', '--keep-last', '2']);
    expect(r.kept).toHaveLength(2);
    expect(r.removed).toHaveLength(before - 2);
    expect(json<{ id: string }[]>(['backup', 'list', 'bk']).map((b) => b.id)).toEqual([...r.kept].reverse());
    expect(json<{ chunks: number }>(['store', 'gc']).chunks).toBeGreaterThanOrEqual(0);
  });
});
