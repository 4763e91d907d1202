// Ferry migration's pure parts: the disk record wire format (versioned, zero invalid), the
// control message envelope, block arithmetic and hash lists, and the convergence controller's
// decisions on made-up rates.
import { describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import { progressLine } from '../../src/cli/migrate.js';
import { decide, queueTarget } from '../../src/migration/converge.js';
import type { MigrationView } from '../../src/migration/source.js';
import { groupCount, groupHashes, groupRanges, isZero, mergeRanges, splitAligned, CHUNK } from '../../src/migration/blocks.js';
import { decodeControl, decodeRecord, encodeControl, encodeRecord, HEADER_BYTES, RecordKind } from '../../src/migration/protocol.js';
import type { NbdClient } from '../../src/nbd/client.js';

describe('disk records', () => {
  it('round-trip, and refuse bad magic, version and kind 0', () => {
    const hash = crypto.randomBytes(32);
    const r = { kind: RecordKind.DATA, disk: 1, offset: 2 ** 40 + 4096, length: 65536, n: 7, hash };
    const b = encodeRecord(r);
    expect(b.length).toBe(HEADER_BYTES);
    expect(decodeRecord(b)).toEqual(r);
    expect(decodeRecord(encodeRecord({ kind: RecordKind.BARRIER, disk: 0, offset: 0, length: 0, n: 3 }))).toEqual({ kind: RecordKind.BARRIER, disk: 0, offset: 0, length: 0, n: 3 });
    const bad = Buffer.from(b);
    bad[0] = 0;
    expect(() => decodeRecord(bad)).toThrow(/malformed/);
    const v2 = Buffer.from(b);
    v2[2] = 2;
    expect(() => decodeRecord(v2)).toThrow(/version 2/);
    const k0 = Buffer.from(b);
    k0[3] = 0;
    expect(() => decodeRecord(k0)).toThrow(/kind 0/);
    expect(() => decodeRecord(b.subarray(0, 10))).toThrow();
  });

  it('control messages carry the protocol version; others are refused', () => {
    const m = decodeControl(encodeControl({ t: 'final', n: 4 }));
    expect(m).toMatchObject({ t: 'final', n: 4 });
    expect(() => decodeControl(Buffer.from('{"v":9,"t":"final"}'))).toThrow(/protocol 9/);
    expect(() => decodeControl(Buffer.from('nope'))).toThrow(/not JSON/);
  });
});

describe('block arithmetic', () => {
  it('merges, splits at chunk boundaries, and maps groups to ranges', () => {
    expect(mergeRanges([{ offset: 100, length: 10 }, { offset: 0, length: 50 }, { offset: 50, length: 10 }])).toEqual([{ offset: 0, length: 60 }, { offset: 100, length: 10 }]);
    const pieces = splitAligned([{ offset: CHUNK - 10, length: CHUNK + 20 }]);
    expect(pieces).toEqual([{ offset: CHUNK - 10, length: 10 }, { offset: CHUNK, length: CHUNK }, { offset: 2 * CHUNK, length: 10 }]);
    expect(groupCount(16 * CHUNK + 1)).toBe(2);
    expect(groupRanges([1], 16 * CHUNK + 4096)).toEqual([{ offset: 16 * CHUNK, length: 4096 }]);
    expect(isZero(Buffer.alloc(100000))).toBe(true);
    const b = Buffer.alloc(100000);
    b[99999] = 1;
    expect(isZero(b)).toBe(false);
  });

  it('group hashes: known-zero chunks hash like read zeroes, and one changed byte changes one group', async () => {
    const size = 40 * CHUNK;
    const disk = Buffer.alloc(size);
    crypto.randomBytes(CHUNK).copy(disk, 3 * CHUNK);
    const reads: number[] = [];
    const fake = { read: async (o: number, l: number) => (reads.push(o), Buffer.from(disk.subarray(o, o + l))) } as unknown as NbdClient;
    const all = [0, 1, 2];
    const a = await groupHashes(fake, size, all, []);
    const zeroRanges = [{ offset: 16 * CHUNK, length: 24 * CHUNK }];
    reads.length = 0;
    const b = await groupHashes(fake, size, all, zeroRanges);
    expect(b).toEqual(a);
    expect(reads.every((o) => o < 16 * CHUNK)).toBe(true); // zero groups were not read
    disk[20 * CHUNK + 5] = 9;
    const c = await groupHashes(fake, size, all, []);
    expect(c[0]).toEqual(a[0]);
    expect(c[1]).not.toEqual(a[1]);
    expect(c[2]).toEqual(a[2]);
  });

  it('takes the hash of a group that reads from the template from the template cache, until the template changes', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { BaseHashes } = await import('../../src/migration/base-hashes.js');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ghash-'));
    const template = path.join(dir, 'tpl.qcow2');
    fs.writeFileSync(template, 'template');
    const size = 48 * CHUNK;
    const disk = crypto.randomBytes(size);
    const reads: number[] = [];
    const fake = { read: async (o: number, l: number) => (reads.push(o), Buffer.from(disk.subarray(o, o + l))) } as unknown as NbdClient;
    // Groups 0 and 2 read from the template (or from nowhere); group 1 has a chunk in the overlay.
    const fromBase = [{ offset: 0, length: 17 * CHUNK }, { offset: 18 * CHUNK, length: 30 * CHUNK }];
    const plain = await groupHashes(fake, size, [0, 1, 2], []);
    const cache = BaseHashes.for(template, CHUNK, 16)!;
    expect(await groupHashes(fake, size, [0, 1, 2], [], CHUNK, 16, { cache, fromBase })).toEqual(plain);
    expect(cache.size).toBe(2);
    cache.save();
    // Another agent (a fresh process's view, through the file) reads only the overlay's group.
    reads.length = 0;
    fs.rmSync(template);
    fs.writeFileSync(template, 'template'); // same size, new inode: the file is not trusted
    const fresh = BaseHashes.for(template, CHUNK, 16)!;
    expect(fresh.size).toBe(0);
    expect(await groupHashes(fake, size, [0, 1, 2], [], CHUNK, 16, { cache: fresh, fromBase })).toEqual(plain);
    fresh.save();
    reads.length = 0;
    const again = await groupHashes(fake, size, [0, 1, 2], [], CHUNK, 16, { cache: BaseHashes.for(template, CHUNK, 16)!, fromBase });
    expect(again).toEqual(plain);
    expect(reads.every((o) => o >= 16 * CHUNK && o < 32 * CHUNK)).toBe(true);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe('convergence controller', () => {
  const base = { linkBytesPerSec: 1.25e6, rttMs: 100, maxDowntimeMs: 300, diskRatio: 1.5, ramRatio: 20, diskDirtyRate: 100e3, diskLastDirtyBytes: 20e3, rounds: 3 };

  it('leaves a guest alone that dirties disk slower than the link drains, and starts RAM', () => {
    const d = decide(base);
    expect(d.ioThrottleBps).toBe(0);
    expect(d.startRam).toBe(true);
    expect(d.downtimeLimitMs).toBeGreaterThan(20);
    expect(d.downtimeLimitMs).toBeLessThan(300);
    expect(d.predictedDowntimeMs).toBeGreaterThan(50);
  });

  it('throttles guest writes when they outpace the link, and says so', () => {
    const d = decide({ ...base, diskDirtyRate: 3e6, diskLastDirtyBytes: 6e6 });
    expect(d.ioThrottleBps).toBeGreaterThan(0);
    expect(d.ioThrottleBps).toBeLessThan(3e6);
    expect(d.note).toMatch(/throttled/);
    expect(d.startRam).toBe(false);
  });

  it('does not throttle on a high dirty rate alone when rounds stay small (link maybe underestimated)', () => {
    expect(decide({ ...base, linkBytesPerSec: 100e3, diskDirtyRate: 100e3, diskLastDirtyBytes: 50e3 }).ioThrottleBps).toBe(0);
  });

  it('gives QEMU a limit scaled by how far below the link its paced stream runs, and counts the queue in the pause', () => {
    const full = decide({ ...base, queueBytes: 128 * 1024 });
    expect(full.downtimeLimitMs).toBeGreaterThan(100); // 300 - 50 one way - disk - 70 at the destination
    const paced = decide({ ...base, queueBytes: 128 * 1024, drainNowBytesPerSec: 0.45e6 });
    expect(paced.downtimeLimitMs).toBeGreaterThan(2.5 * full.downtimeLimitMs);
    expect(Math.abs(decide({ ...base, queueBytes: 128 * 1024, drainNowBytesPerSec: 1 }).downtimeLimitMs - 4 * full.downtimeLimitMs)).toBeLessThanOrEqual(2); // at most 4x
    const queued = decide({ ...base, queueBytes: 512 * 1024 });
    expect(queued.downtimeLimitMs).toBeLessThan(full.downtimeLimitMs);
    expect(queued.predictedDowntimeMs).toBeGreaterThan(full.predictedDowntimeMs + 200);
  });

  it('allows CPU throttling only after RAM failed to converge for a while', () => {
    expect(decide({ ...base, ram: { remaining: 1e8, dirtyBytesPerSec: 5e7, secondsInRam: 5 } }).throttleTrigger).toBe(100);
    expect(decide({ ...base, ram: { remaining: 1e8, dirtyBytesPerSec: 5e7, secondsInRam: 120 } }).throttleTrigger).toBe(50);
    // Still not converged a minute in: QEMU's pause limit doubles every 10 s, at most 8x.
    const at = (secondsInRam: number) => decide({ ...base, ram: { remaining: 1e8, dirtyBytesPerSec: 5e7, secondsInRam } });
    expect(at(59).downtimeLimitMs).toBe(at(5).downtimeLimitMs);
    expect(Math.abs(at(60).downtimeLimitMs - 2 * at(5).downtimeLimitMs)).toBeLessThanOrEqual(2);
    expect(at(60).note).toMatch(/limit raised 2×/);
    expect(Math.abs(at(600).downtimeLimitMs - 8 * at(5).downtimeLimitMs)).toBeLessThanOrEqual(4);
  });

  it('keeps half the window queued for the first pass over RAM, then one bandwidth-delay product (≥ 128 KiB, ≥ 50 ms)', () => {
    const w = { window: 1 << 20, firstPass: false };
    expect(queueTarget({ ...w, drainBytesPerSec: 1.25e6, rttMs: 100 })).toBe(128 * 1024); // wan-10
    expect(queueTarget({ ...w, drainBytesPerSec: 1.25e6, rttMs: 100, firstPass: true })).toBe(512 * 1024);
    expect(queueTarget({ ...w, drainBytesPerSec: 12.5e6, rttMs: 100 })).toBe(1.25e6); // wan-100
    expect(queueTarget({ ...w, drainBytesPerSec: 400e6, rttMs: 1 })).toBe(20e6); // lan
  });
});

describe('destination disk receiver', () => {
  it('verifies every block at a barrier, and keeps a mismatch unresolved until it is written again', async () => {
    const { DiskReceiver } = await import('../../src/migration/disk-dest.js');
    const { sha256 } = await import('../../src/migration/blocks.js');
    const disk = Buffer.alloc(1 << 20);
    let corruptNext = false;
    const nbd = {
      size: disk.length,
      write: async (o: number, d: Buffer) => {
        d.copy(disk, o);
        if (corruptNext) {
          disk[o] = disk[o]! ^ 1;
          corruptNext = false;
        }
      },
      writeZeroes: async (o: number, l: number) => void disk.fill(0, o, o + l),
      flush: async () => {},
      read: async (o: number, l: number) => Buffer.from(disk.subarray(o, o + l)),
    } as unknown as NbdClient;
    const sent: unknown[] = [];
    const peer = { send: async (m: unknown) => void sent.push(m) } as never;
    const rx = new DiskReceiver([nbd], peer);
    const block = crypto.randomBytes(CHUNK);
    const data = (offset: number, n: number) => {
      rx.push(encodeRecord({ kind: RecordKind.DATA, disk: 0, offset, length: CHUNK, n, hash: sha256(block) }));
      rx.push(block);
    };
    corruptNext = true; // the write path flips a bit of the first block
    data(0, 1);
    data(CHUNK, 1);
    rx.push(encodeRecord({ kind: RecordKind.BARRIER, disk: 0, offset: 0, length: 0, n: 1 }));
    await rx.drain();
    expect(sent[0]).toMatchObject({ t: 'barrier-ok', n: 1, verified: CHUNK, mismatches: [{ disk: 0, offset: 0, length: CHUNK }] });
    expect(rx.unresolvedCount()).toBe(1);
    data(0, 2); // re-sent, written correctly this time
    rx.push(encodeRecord({ kind: RecordKind.BARRIER, disk: 0, offset: 0, length: 0, n: 2 }));
    await rx.drain();
    expect(sent[1]).toMatchObject({ t: 'barrier-ok', n: 2, verified: CHUNK, mismatches: [] });
    expect(rx.unresolvedCount()).toBe(0);
    expect(() => rx.push(Buffer.alloc(HEADER_BYTES))).toThrow(/malformed/);
  });
});

describe('guest RAM check', () => {
  it('hashes guest RAM per MiB on worker threads, finds the groups that differ, and repairs them', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { differingGroups, readGroup, writeGroup } = await import('../../src/migration/ram-verify.js');
    const { hashRam, RAM_GROUP, RAM_HASH_BYTES } = await import('../../src/migration/ram-hash.js');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-'));
    const a = path.join(dir, 'a.ram');
    const b = path.join(dir, 'b.ram');
    const mem = Buffer.alloc(8 * RAM_GROUP);
    crypto.randomFillSync(mem, 2 * RAM_GROUP, RAM_GROUP); // one group of data, the rest zero
    fs.writeFileSync(a, mem);
    mem[5 * RAM_GROUP + 17] = 1;
    mem[2 * RAM_GROUP] ^= 0xff;
    fs.writeFileSync(b, mem);
    const ha = await hashRam(a, 8 * RAM_GROUP);
    expect(ha.length).toBe(8 * RAM_HASH_BYTES);
    expect(differingGroups(ha, await hashRam(b, 8 * RAM_GROUP))).toEqual([2, 5]);
    for (const g of [2, 5]) writeGroup(b, g, readGroup(a, g));
    expect(differingGroups(ha, await hashRam(b, 8 * RAM_GROUP))).toEqual([]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('hashes at a width the switchover can hold and release, to the same hashes', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { hashRam, RamHashJob, RAM_GROUP } = await import('../../src/migration/ram-hash.js');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-'));
    const a = path.join(dir, 'a.ram');
    const mem = Buffer.alloc(11 * RAM_GROUP + 4096); // a short last group
    crypto.randomFillSync(mem, 3 * RAM_GROUP, 5 * RAM_GROUP);
    fs.writeFileSync(a, mem);
    const all = Array.from({ length: 12 }, (_, g) => g);
    const job = new RamHashJob(a, all);
    let done = false;
    void job.done.then(() => (done = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(done).toBe(false); // width 0 until told
    expect(job.remaining).toBe(12);
    job.width(1);
    expect((await job.done).equals(await hashRam(a, mem.length))).toBe(true);
    expect(job.remaining).toBe(0);
    expect(job.zeroGroups).toBe(6); // 0–2 and 8–10 (the short last one is hashed)
    // A listed subset, in the list's order; a cancelled job rejects.
    const some = new RamHashJob(a, [9, 4]);
    some.width(2);
    const h = await hashRam(a, mem.length);
    expect(await some.done).toEqual(Buffer.concat([h.subarray(9 * 16, 10 * 16), h.subarray(4 * 16, 5 * 16)]));
    // A thread over the width does not wait once every group is taken (else it would sit out the
    // 10 s hold limit, and the pool with it, after a one-thread job).
    const { hashReady, runTask } = await import('../../src/migration/ram-hash.js');
    await hashReady();
    const control = new Int32Array(new SharedArrayBuffer(12));
    control[1] = 12; // every group taken; width 0
    const t0 = Date.now();
    expect(runTask({ file: a, groups: all, control, out: new Uint8Array(12 * 16) }, 1)).toBe('done');
    expect(Date.now() - t0).toBeLessThan(1000);
    const cancelled = new RamHashJob(a, all);
    cancelled.cancel();
    await expect(cancelled.done).rejects.toThrow(/cancelled/);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('the addon hashes guest RAM where it lies, to the same hashes as read(2) and WebAssembly; a replaced file is mapped again', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { hashReady, RamHashJob, releaseRam, runTask, RAM_GROUP } = await import('../../src/migration/ram-hash.js');
    const { nativeAddon: nativeHasher } = await import('../../src/util/native.js');
    // Built by `npm ci` (native/): a missing addon is a failed install here, not a fallback.
    const nat = nativeHasher();
    expect(nat).not.toBeNull();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-'));
    const a = path.join(dir, 'a.ram');
    const mem = Buffer.alloc(6 * RAM_GROUP + 8192); // zero groups, data groups, a short zero tail
    crypto.randomFillSync(mem, 1 * RAM_GROUP, 2 * RAM_GROUP);
    mem[4 * RAM_GROUP + RAM_GROUP - 1] = 1; // one byte at a group's very end
    fs.writeFileSync(a, mem);
    const groups = Array.from({ length: 8 }, (_, g) => g); // the last one lies past the end
    // The JavaScript path: no mapping in the task.
    await hashReady();
    const plain = new Uint8Array(groups.length * 16);
    expect(runTask({ file: a, groups, control: Int32Array.from([2, 0, 0]), out: plain }, 0)).toBe('done');
    const job = new RamHashJob(a, groups);
    job.width(2);
    expect(Buffer.from(await job.done).equals(Buffer.from(plain))).toBe(true);
    expect(job.zeroGroups).toBe(3); // 0, 3 and 5; the short tail and the group past the end are hashed
    // The file replaced under the same name (a new VM's RAM): mapped again, not the old pages.
    releaseRam(a);
    const stale = new RamHashJob(a, [1]);
    stale.width(1);
    const before = await stale.done;
    fs.rmSync(a);
    fs.writeFileSync(a, Buffer.alloc(mem.length, 7));
    const fresh = new RamHashJob(a, [1]);
    fresh.width(1);
    expect((await fresh.done).equals(before)).toBe(false);
    releaseRam(a);
    // Bad calls throw, they do not crash the process.
    expect(() => nat!.hashGroup(999, 0, 1, new Uint8Array(16), 0)).toThrow(/no such mapping/);
    expect(() => nat!.hashGroup(0, 0, 1, new Uint8Array(8), 0)).toThrow(/16 bytes/);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe('progress line', () => {
  const view = (over: Record<string, unknown>) =>
    ({ startedAt: Date.now(), phase: 'disk', etaSec: null, wire: { sentBytes: 0, drainBytesPerSec: 0, connections: 1 }, disk: { round: 0, roundDone: 1, roundTotal: 2, dirtyRate: 0 }, ram: null, ...over }) as unknown as MigrationView;
  it('says a dirty rate is not measured yet rather than showing 0', () => {
    expect(progressLine(view({}))).toContain('dirty – (measured after round 0)');
    expect(progressLine(view({ disk: { round: 2, roundDone: 1, roundTotal: 2, dirtyRate: 102400 } }))).toContain('dirty 100 KiB/s');
    const ram = { transferred: 10, remaining: 90, total: 100, dirtyBytesPerSec: 0, cpuThrottle: 0 };
    expect(progressLine(view({ phase: 'ram', ram }))).toContain('dirty – (measured after the first pass)');
    expect(progressLine(view({ phase: 'ram', ram: { ...ram, transferred: 200 } }))).toContain('dirty 0 B/s');
  });

  it('shows the snapshot files being copied before the live part', () => {
    expect(progressLine(view({ phase: 'begin', files: { done: 1 << 20, total: 4 << 20, snapshots: 2 } }))).toMatch(/snapshot files \[#+\.+\] 1(\.0)? MiB\/4(\.0)? MiB/);
  });
});

describe('RAM stream pacing (ram-pipe)', () => {
  it('stops reading QEMU while the transport holds more than the target, spools while the link is down', async () => {
    const net = await import('node:net');
    const os = await import('node:os');
    const path = await import('node:path');
    const { listenForQemu } = await import('../../src/migration/ram-pipe.js');
    const sock = path.join(os.tmpdir(), `ferry-rampipe-${process.pid}.sock`);
    let sent = 0;
    const session = { unackedPayload: 0, send: async (_ch: number, b: Buffer) => void (sent += b.length) };
    let open = false;
    const src = await listenForQemu(sock, session as never, { target: () => 64 * 1024, open: () => open });
    const c = net.connect(sock);
    await new Promise((r) => c.once('connect', r));
    const until = async (pred: () => boolean) => {
      for (let i = 0; i < 200 && !pred(); i++) await new Promise((r) => setTimeout(r, 10));
    };
    // The queue is over the target: after at most a socket read or two, nothing more is taken.
    session.unackedPayload = 1 << 20;
    c.write(Buffer.alloc(8 << 20, 1));
    await until(() => sent > 0);
    await new Promise((r) => setTimeout(r, 100));
    const held = sent;
    expect(held).toBeLessThan(1 << 20);
    await new Promise((r) => setTimeout(r, 100));
    expect(sent).toBe(held);
    // The link is down: the gate opens and the stream is spooled (QEMU is not left blocked).
    open = true;
    await until(() => sent >= 8 << 20);
    expect(sent).toBe(8 << 20);
    // The queue drained with the gate closed again: reading resumes.
    open = false;
    session.unackedPayload = 0;
    c.end(Buffer.alloc(1 << 20, 2));
    await src.ended;
    expect(src.bytes()).toBe(9 << 20);
    src.close();
  });
});

describe('snapshot files (snapshot-chain)', () => {
  it('sends a chain as files, checks each SHA-256, re-uses cached copies, and rebuilds the chain elsewhere', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { execFileSync } = await import('node:child_process');
    const chain = await import('../../src/migration/snapshot-chain.js');
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chain-'));
    const [src, cache, dst] = ['src', 'cache', 'dst'].map((d) => path.join(root, d));
    for (const d of [src, cache, dst]) fs.mkdirSync(d);
    const img = (f: string, backing?: string) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-F', 'qcow2', '-b', backing] : []), f, '4M']);
    img(path.join(src, 'vdb.qcow2'));
    execFileSync('qemu-io', ['-c', 'write -P 7 0 64k', path.join(src, 'vdb.qcow2')]);
    img(path.join(src, 'vdb-aaaaaa.qcow2'), path.join(src, 'vdb.qcow2'));
    fs.writeFileSync(path.join(src, 'state-s1-aaaaaa.bin'), crypto.randomBytes(200_000));
    const spec = { name: 'v', uuid: 'u', vcpus: 1, memoryMiB: 64, disks: [], nics: [] };
    const rows = [{ vm: 'v', name: 's1', parent: null, createdAt: 1, status: 'ready' as const, files: [path.join(src, 'vdb.qcow2')], stateFile: path.join(src, 'state-s1-aaaaaa.bin'), wasRunning: true, prevSpec: spec }];
    const m = (await chain.buildManifest(src, rows, 's1', [path.join(src, 'vdb-aaaaaa.qcow2')]))!;
    expect(m.files.map((f) => [f.name, f.image])).toEqual([['vdb.qcow2', true], ['state-s1-aaaaaa.bin', false]]);
    expect(m.tops).toEqual([{ kind: 'file', name: 'vdb.qcow2' }]);
    expect(chain.chainProblems(m)).toEqual([]);
    expect(chain.chainProblems({ ...m, tops: [{ kind: 'template', path: '/nonexistent/t.qcow2' }] })[0]).toMatch(/lacks \/nonexistent/);
    // Over a fake session: one header message, then the bytes in ≤ 64 KiB messages.
    const rx = new chain.FileReceiver(cache);
    const session = { send: async (_ch: number, b: Buffer) => rx.message(b) } as unknown as import('../../src/transport/session.js').Session;
    let sent = 0;
    await chain.sendFiles(session, src, m.files.map((file) => ({ file, from: 0 })), (n) => (sent += n));
    expect(sent).toBe(m.files.reduce((a, f) => a + f.size, 0));
    await rx.complete(m.files);
    // A retry finds them in the cache; a file that changed is not taken.
    expect(await new chain.FileReceiver(cache).have(m.files)).toEqual({ whole: ['vdb.qcow2', 'state-s1-aaaaaa.bin'], partial: [] });
    expect(await new chain.FileReceiver(cache).have([{ ...m.files[1]!, sha256: '0'.repeat(64) }])).toEqual({ whole: [], partial: [] });
    const bad = new chain.FileReceiver(path.join(root, 'bad'));
    await chain.sendFiles({ send: async (_c: number, b: Buffer) => bad.message(b.length > 1000 ? Buffer.from(b).fill(1, 0, 1) : b) } as unknown as typeof session, src, [{ file: m.files[1]!, from: 0 }], () => {});
    await expect(bad.complete(m.files.slice(1))).rejects.toMatchObject({ code: 'VERIFY_FAILED' });
    const junk = new chain.FileReceiver(path.join(root, 'junk'));
    junk.message(Buffer.from('{"name":"../etc/passwd","size":1}'));
    await expect(junk.complete(m.files)).rejects.toMatchObject({ code: 'MIGRATION_FAILED' });
    // Installed elsewhere: moved into the VM's directory, backing paths pointing there.
    const installed = await chain.installChain(m, cache, dst, 'v', spec);
    expect(installed[0]!.files).toEqual([path.join(dst, 'vdb.qcow2')]);
    expect(installed[0]!.stateFile).toBe(path.join(dst, 'state-s1-aaaaaa.bin'));
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', chain.backingPath(m.tops[0], dst)!, path.join(dst, 'top.qcow2')]);
    const read = execFileSync('qemu-io', ['-c', 'read -P 7 0 64k', path.join(dst, 'top.qcow2')], { encoding: 'utf8' });
    expect(read).toMatch(/read 65536\/65536/);
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('resumes a file a previous attempt cut short after the prefix the destination holds; a prefix that differs goes whole', async () => {
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const chain = await import('../../src/migration/snapshot-chain.js');
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chain-'));
    const [src, cache] = ['src', 'cache'].map((d) => path.join(root, d));
    for (const d of [src, cache]) fs.mkdirSync(d);
    const data = crypto.randomBytes(300_000);
    fs.writeFileSync(path.join(src, 'state-s1-bbbbbb.bin'), data);
    const file = { name: 'state-s1-bbbbbb.bin', size: data.length, sha256: crypto.createHash('sha256').update(data).digest('hex'), image: false };
    const over = (rx: InstanceType<typeof chain.FileReceiver>) => ({ send: async (_c: number, b: Buffer) => rx.message(b) }) as unknown as import('../../src/transport/session.js').Session;
    // The first attempt: the header and two 64 KiB pieces, then the migration stops.
    const first = new chain.FileReceiver(cache);
    first.message(Buffer.from(JSON.stringify({ name: file.name, size: file.size })));
    first.message(data.subarray(0, 65536));
    first.message(data.subarray(65536, 131072));
    first.close();
    // The retry: the destination offers the prefix, the source checks it and sends the rest.
    const rx = new chain.FileReceiver(cache);
    const held = await rx.have([file]);
    expect(held.whole).toEqual([]);
    expect(held.partial).toEqual([{ name: file.name, bytes: 131072, sha256: crypto.createHash('sha256').update(data.subarray(0, 131072)).digest('hex') }]);
    const plan = await chain.planFiles(src, [file], held.partial);
    expect(plan).toEqual([{ file, from: 131072 }]);
    let sent = 0;
    await chain.sendFiles(over(rx), src, plan, (n) => (sent += n));
    expect(sent).toBe(data.length - 131072);
    await rx.complete([file]);
    expect(fs.readFileSync(path.join(cache, file.name)).equals(data)).toBe(true);
    // A prefix that is not the source's (a changed file, a torn write): the file goes whole.
    fs.rmSync(path.join(cache, file.name));
    fs.writeFileSync(path.join(cache, `${file.name}.part`), Buffer.alloc(70_000, 9));
    const rx2 = new chain.FileReceiver(cache);
    const plan2 = await chain.planFiles(src, [file], (await rx2.have([file])).partial);
    expect(plan2).toEqual([{ file, from: 0 }]);
    await chain.sendFiles(over(rx2), src, plan2, () => {});
    await rx2.complete([file]);
    expect(fs.readFileSync(path.join(cache, file.name)).equals(data)).toBe(true);
    // A resume the destination did not offer is a protocol error, not a file with a hole.
    const rx3 = new chain.FileReceiver(path.join(root, 'other'));
    rx3.message(Buffer.from(JSON.stringify({ name: file.name, size: file.size, from: 65536 })));
    await expect(rx3.complete([file])).rejects.toMatchObject({ code: 'MIGRATION_FAILED', cause: { code: 'TRANSPORT_PROTOCOL' } });
    fs.rmSync(root, { recursive: true, force: true });
  });
});
