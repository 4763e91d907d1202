// The migration-stream reader (src/qemu/migration-stream.ts) against QEMU itself: a guest that
// rewrites 8 MiB of RAM is migrated to a file; a second QEMU loads that file; the guest RAM the
// reader rebuilds from the page records it reports must equal, byte for byte, what QEMU's own
// loader put into the second guest's memory. Fed in random cuts, as the transport delivers it.
// The same stream through Ferry's RAM codec comes out byte for byte. And without QEMU's JSON
// device description at its end (`suppress-vmdesc` on both ends), a destination still completes.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { RamDecoder, RamEncoder } from '../../src/migration/ram-codec.js';
import { migrateContinue, ramCapabilities } from '../../src/qemu/migration-ops.js';
import { MigrationStreamReader } from '../../src/qemu/migration-stream.js';
import { QmpClient } from '../../src/qemu/qmp.js';
import { guestImage, sleep, waitFor } from './harness.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-stream-'));
const procs: ChildProcess[] = [];
const shm: string[] = [];
afterAll(() => {
  procs.forEach((p) => p.kill('SIGKILL'));
  shm.forEach((f) => fs.rmSync(f, { force: true }));
  fs.rmSync(dir, { recursive: true, force: true });
});

function qemu(name: string, extra: string[]): { qmp: string; ram: string } {
  const img = guestImage();
  const ram = `/dev/shm/ferry-stream-test-${process.pid}-${name}`;
  shm.push(ram);
  const qmp = path.join(dir, `${name}.qmp`);
  // prettier-ignore
  const p = spawn('qemu-system-x86_64', [
    '-accel', 'tcg', '-machine', 'pc,memory-backend=pc.ram', '-cpu', 'qemu64', '-m', '128',
    '-object', `memory-backend-file,id=pc.ram,size=128M,mem-path=${ram},share=on`,
    '-display', 'none', '-nodefaults', '-kernel', img.kernel, '-initrd', img.initrd,
    '-append', 'console=ttyS0 ferry.dirty=8 ferry.hb=0', '-qmp', `unix:${qmp},server=on,wait=off`, ...extra,
  ], { stdio: 'ignore' });
  procs.push(p);
  return { qmp, ram };
}

describe('QEMU migration stream reader', () => {
  it('reports every page record exactly as QEMU 7.2 loads them', async () => {
    const stream = path.join(dir, 'stream');
    const a = qemu('a', []);
    const qa = await QmpClient.connect(a.qmp);
    await sleep(12_000); // boot, and the RAM dirtier running
    await qa.execute('migrate', { uri: `exec:cat > ${stream}` });
    await waitFor('the migration to the file', 120_000, async () => ((await qa.execute<{ status: string }>('query-migrate')).status === 'completed' ? true : undefined));
    qa.close();

    const b = qemu('b', ['-S', '-incoming', `exec:cat ${stream}`]);
    const qb = await QmpClient.connect(b.qmp);
    await waitFor('the load', 120_000, async () => ((await qb.execute<{ status: string }>('query-status')).status === 'paused' ? true : undefined));
    const loaded = fs.readFileSync(b.ram);
    qb.close();

    const s = fs.readFileSync(stream);
    expect(s.includes('{"page_size"')).toBe(true); // QEMU's default: the device description (JSON) at the end
    const rebuilt = Buffer.alloc(loaded.length, 0x5a);
    const perBlock = new Map<string, number>();
    const r = new MigrationStreamReader({
      page(block, offset, p) {
        perBlock.set(block, (perBlock.get(block) ?? 0) + 1);
        if (block !== 'pc.ram') return;
        if ('fill' in p) rebuilt.fill(p.fill, offset, offset + 4096);
        else s.copy(rebuilt, offset, p.at, p.at + 4096);
      },
    });
    for (let pos = 0; pos < s.length; ) {
      const n = 1 + Math.floor(Math.random() * 70_000);
      r.push(s.subarray(pos, pos + n));
      pos += n;
    }
    expect(r.stopped).toBeUndefined();
    expect(r.finished).toBe(true);
    expect(perBlock.get('pc.ram')).toBeGreaterThanOrEqual(128 * 256); // every page at least once
    expect(perBlock.get('pc.bios')).toBeGreaterThan(0);
    expect(rebuilt.equals(loaded)).toBe(true);

    // Ferry's page-delta codec (ram-codec.ts) on the same stream, in random cuts: the destination
    // side rebuilds it byte for byte, and it is smaller (pages QEMU re-sent cross as deltas).
    const enc = new RamEncoder(128 * 2 ** 20);
    const dec = new RamDecoder(128 * 2 ** 20);
    const outs: Buffer[] = [];
    for (let pos = 0; pos < s.length; ) {
      const n = 1 + Math.floor(Math.random() * 70_000);
      outs.push(dec.push(enc.push(s.subarray(pos, pos + n))));
      pos += n;
    }
    outs.push(dec.push(enc.end()));
    expect(Buffer.concat(outs).equals(s)).toBe(true);
    expect(enc.encodedBytes).toBeLessThan(s.length);
  }, 300_000);

  it('ends the stream without the device description when both ends suppress it, and the destination completes', async () => {
    const stream = path.join(dir, 'stream-novmdesc');
    const caps = { xbzrle: false, autoConverge: true, noVmdesc: true };
    const a = qemu('c', []);
    const qa = await QmpClient.connect(a.qmp);
    await ramCapabilities(qa, caps); // as the source agent sets them (pause-before-switchover included)
    await qa.execute('migrate', { uri: `exec:cat > ${stream}` });
    await waitFor('the pause before the switchover', 120_000, async () => ((await qa.execute<{ status: string }>('query-migrate')).status === 'pre-switchover' ? true : undefined));
    await migrateContinue(qa);
    await waitFor('the migration to the file', 120_000, async () => ((await qa.execute<{ status: string }>('query-migrate')).status === 'completed' ? true : undefined));
    qa.close();
    const s = fs.readFileSync(stream);
    expect(s.includes('{"page_size"')).toBe(false);
    expect(s[s.length - 1]).toBe(0x00); // QEMU_VM_EOF is the last byte

    const b = qemu('d', ['-S', '-incoming', 'defer']);
    const qb = await QmpClient.connect(b.qmp);
    await ramCapabilities(qb, caps); // as the destination agent sets them from `ram-start`
    await qb.execute('migrate-incoming', { uri: `exec:cat ${stream}` });
    await waitFor('the load', 120_000, async () => ((await qb.execute<{ status: string }>('query-migrate')).status === 'completed' ? true : undefined));
    expect((await qb.execute<{ status: string }>('query-status')).status).toBe('paused');
    qb.close();
  }, 300_000);
});
