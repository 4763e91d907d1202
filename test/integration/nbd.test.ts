// Ferry's NBD client against a real NBD server (qemu-nbd from Debian's qemu-utils): handshake
// with structured replies, pipelined reads and writes, zeroes, flush, allocation map, and a
// QEMU dirty bitmap read through its meta context.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { waitFor } from '../../src/util/wait.js';

const procs: ChildProcess[] = [];
afterEach(() => procs.splice(0).forEach((p) => p.kill('SIGKILL')));

async function serve(file: string, extra: string[] = []): Promise<string> {
  const sock = path.join(path.dirname(file), 'nbd.sock');
  const p = spawn('qemu-nbd', ['-k', sock, '--persistent', '-f', 'qcow2', '-x', 'disk', ...extra, file], { stdio: 'ignore' });
  procs.push(p);
  await waitFor('qemu-nbd', 10_000, () => (fs.existsSync(sock) ? true : undefined));
  return sock;
}

describe('NBD client', () => {
  it('reads, writes (pipelined), zeroes, flushes and maps allocation', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-nbd-'));
    const file = path.join(dir, 'd.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '64M']);
    const sock = await serve(file);
    const c = await NbdClient.connect({ path: sock }, 'disk', ['base:allocation']);
    expect(c.size).toBe(64 << 20);
    const blocks = Array.from({ length: 64 }, () => crypto.randomBytes(4096));
    await Promise.all(blocks.map((b, i) => c.write(i * 1024 * 1024, b)));
    await c.flush();
    const back = await Promise.all(blocks.map((_, i) => c.read(i * 1024 * 1024, 4096)));
    back.forEach((b, i) => expect(b.equals(blocks[i]!)).toBe(true));
    await c.writeZeroes(0, 4096);
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    // Unwritten space reads as zeroes (a hole in a structured reply) and maps as a hole.
    expect((await c.read((40 << 20) + 65536, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    const map = await c.map('base:allocation');
    expect(map.reduce((a, e) => a + e.length, 0)).toBe(64 << 20);
    const data = map.filter((e) => (e.flags & 1) === 0);
    expect(data.some((e) => e.offset <= 1 << 20 && e.offset + e.length > 1 << 20)).toBe(true);
    expect(map.some((e) => e.flags & 1)).toBe(true);
    await c.close();
  });

  it("reads a QEMU dirty bitmap's extents through qemu:dirty-bitmap", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-nbd-'));
    const file = path.join(dir, 'd.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '32M']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '4096', file, 'bm0']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 1M 8K', '-c', 'write -P 9 20M 4K', file], { stdio: 'ignore' });
    execFileSync('qemu-img', ['bitmap', '--disable', file, 'bm0']);
    const sock = await serve(file, ['-r', '-B', 'bm0']);
    const c = await NbdClient.connect({ path: sock }, 'disk', ['qemu:dirty-bitmap:bm0']);
    const dirty = (await c.map('qemu:dirty-bitmap:bm0')).filter((e) => e.flags & 1);
    expect(dirty).toEqual([
      { offset: 1 << 20, length: 8192, flags: 1 },
      { offset: 20 << 20, length: 4096, flags: 1 },
    ]);
    expect((await c.read(1 << 20, 8192)).equals(Buffer.alloc(8192, 7))).toBe(true);
    await c.close();
  });

  it('refuses an export that does not exist, with NBD_ERROR', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-nbd-'));
    const file = path.join(dir, 'd.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '1M']);
    const sock = await serve(file);
    await expect(NbdClient.connect({ path: sock }, 'nope')).rejects.toMatchObject({ code: 'NBD_ERROR' });
  });
});
