// The QEMU migration-stream reader on synthetic streams (cut at every byte, unknown records) and
// the destination's RAM tracker built on it (early hashes kept only for untouched groups). The
// reader against a real QEMU stream: test/integration/migration-stream.test.ts.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { MigrationStreamReader } from '../../src/qemu/migration-stream.js';
import { RamTracker } from '../../src/migration/ram-track.js';
import { hashRam } from '../../src/migration/ram-hash.js';

import { end, head, MiB, page, part, str, u16, u32, u64, u8, zero } from './fixtures/qemu-stream.js';

describe('migration stream reader', () => {
  const stream = Buffer.concat([
    head(),
    u8(0x08), u16(1), u16(3), Buffer.from('abc'), // a command between sections is skipped
    part(page(0, 1, 'pc.ram'), zero(MiB + 4096), page(3 * MiB, 3), page(0, 9, 'vga')),
    end(page(2 * MiB, 2, 'pc.ram')),
  ]);
  const want = [['pc.ram', 0, 'page'], ['pc.ram', MiB + 4096, 'zero'], ['pc.ram', 3 * MiB, 'page'], ['vga', 0, 'page'], ['pc.ram', 2 * MiB, 'page']];

  for (const cut of [1, 7, 4096, 100_000]) {
    it(`reports every page record with the stream cut every ${cut} bytes`, () => {
      const got: unknown[] = [];
      const r = new MigrationStreamReader({ page: (b, o, p) => got.push([b, o, 'fill' in p ? 'zero' : 'page']) });
      for (let i = 0; i < stream.length; i += cut) r.push(stream.subarray(i, i + cut));
      expect(r.stopped).toBeUndefined();
      expect(r.finished).toBe(true);
      expect(got).toEqual(want);
    });
  }

  it('points at the page bytes in the stream', () => {
    const ats: number[] = [];
    new MigrationStreamReader({ page: (_b, _o, p) => 'at' in p && ats.push(p.at) }).push(stream);
    expect(stream[ats[0]!]).toBe(1);
    expect(stream.subarray(ats[1]!, ats[1]! + 4096).equals(Buffer.alloc(4096, 3))).toBe(true);
  });

  it('stops, with the reason, at what it does not know: XBZRLE pages, other iterable sections, bad magic', () => {
    const xbzrle = Buffer.concat([head(), u8(0x02), u32(2), u64(0x40 | 0x20)]);
    const r1 = new MigrationStreamReader({ page: () => {} });
    r1.push(xbzrle);
    expect(r1.stopped).toMatch(/flags 0x60/);
    const block = Buffer.concat([u32(0x5145564d), u32(3), u8(0x01), u32(2), str('block'), u32(0), u32(1)]);
    const r2 = new MigrationStreamReader({ page: () => {} });
    r2.push(block);
    expect(r2.stopped).toMatch(/"block"/);
    const r3 = new MigrationStreamReader({ page: () => {} });
    r3.push(Buffer.from('not a stream'));
    expect(r3.stopped).toMatch(/not a QEMU/);
  });
});

describe('destination RAM tracker', () => {
  it('hashes groups early, and in the pause only those a later record touched', async () => {
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-track-')), 'ram');
    fs.writeFileSync(file, Buffer.alloc(4 * MiB, 7));
    const t = new RamTracker(file, 4 * MiB, 0);
    t.feed(Buffer.concat([head(), part(page(0, 1, 'pc.ram'), page(MiB, 1), page(3 * MiB, 1))]));
    const fed = head().length + part(page(0, 1, 'pc.ram'), page(MiB, 1), page(3 * MiB, 1)).length;
    await t.refresh(fed); // QEMU has not read these records yet: only group 2 (untouched) is hashed
    await t.refresh(0); // the other three
    // The last iteration rewrites a page of group 2 (as QEMU would load it into the file).
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 2), 0, 4096, 2 * MiB);
    fs.closeSync(fd);
    t.feed(end(page(2 * MiB, 2, 'pc.ram')));
    const r = await t.final();
    expect(r.stats).toEqual({ finalGroups: 1, earlyGroups: 4 }); // in the pause only group 2, which the END record touched
    expect(r.hashes.equals(await hashRam(file, 4 * MiB))).toBe(true);
  });

  it('hashes every group in the pause when the stream is one it cannot read', async () => {
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-track-')), 'ram');
    fs.writeFileSync(file, Buffer.alloc(2 * MiB, 7));
    const t = new RamTracker(file, 2 * MiB, 0);
    t.feed(Buffer.concat([head(), u8(0x02), u32(2), u64(0x40 | 0x20)]));
    await t.refresh(0);
    const r = await t.final();
    expect(r.stats.finalGroups).toBe(2);
    expect(r.stats.readerStopped).toMatch(/flags/);
    expect(r.hashes.equals(await hashRam(file, 2 * MiB))).toBe(true);
  });
});
