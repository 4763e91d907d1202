// Why this file exists: what a migration benchmark run is made of — the scenario (VM size, disk
// size and used data, guest workload) and the native QEMU tunings it can try — plus the
// deterministic data a scenario's disk starts with (half incompressible, half Debian files from
// the guest template, so compression and dedup figures mean something).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { NativeTuning } from '../qemu/native-migration.js';
import { run } from '../util/exec.js';

export interface Scenario {
  profile: string;
  memoryMiB: number;
  diskBytes: number;
  usedBytes: number;
  /** guest disk writer, bytes/s */
  writeRate: number;
  /** guest RAM dirtier, MiB */
  dirtyMiB: number;
  /**
   * guest heartbeat rate (Hz). The guest's clock stands still while it is paused, so the largest
   * heartbeat gap is the pause plus one period: 50 Hz (since session 6; 10 Hz before) keeps
   * that to 20 ms. Absent in results recorded before it was configurable (10 Hz).
   */
  heartbeatHz?: number;
  seed: number;
  cc: 'cubic' | 'bbr';
  timeoutSec: number;
  /** libvirt's --timeout for the native runs: suspend the guest after this many seconds */
  suspendAfterSec?: number;
}

export const NATIVE_VARIANTS: Record<string, NativeTuning> = {
  plain: { capabilities: [], parameters: {} },
  'auto-converge': { capabilities: ['auto-converge'], parameters: {} },
  'multifd-zstd': { capabilities: ['multifd', 'auto-converge'], parameters: { 'multifd-channels': 4, 'multifd-compression': 'zstd' } },
  xbzrle: { capabilities: ['xbzrle', 'auto-converge'], parameters: { 'xbzrle-cache-size': 64 * 1024 * 1024 } },
  'multifd-zstd-g4k': { capabilities: ['multifd', 'auto-converge'], parameters: { 'multifd-channels': 4, 'multifd-compression': 'zstd' }, granularity: 4096 },
};

/**
 * A qcow2 data disk of `diskBytes` whose first `usedBytes` hold deterministic data: 64 KiB
 * chunks, alternately random (seeded) and slices of `template` (real Debian files).
 */
export async function makeDataDisk(file: string, s: Pick<Scenario, 'diskBytes' | 'usedBytes' | 'seed'>, template: string): Promise<void> {
  const raw = `${file}.raw`;
  const CH = 64 * 1024;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const fd = fs.openSync(raw, 'w');
  try {
    fs.ftruncateSync(fd, s.diskBytes);
    const tplRaw = `${file}.tpl.raw`;
    await run('qemu-img', ['convert', '-U', '-O', 'raw', template, tplRaw]);
    const tfd = fs.openSync(tplRaw, 'r');
    const tplSize = fs.fstatSync(tfd).size;
    const buf = Buffer.alloc(CH);
    for (let off = 0, i = 0; off < s.usedBytes; off += CH, i++) {
      if (i % 2 === 0) {
        let k = 0;
        while (k < CH) {
          const h = crypto.createHash('sha512').update(`${s.seed}:${i}:${k}`).digest();
          h.copy(buf, k);
          k += h.length;
        }
      } else {
        // Skip the template's empty regions: a window whose every 4 KiB block holds data, so
        // the disk really has `usedBytes` allocated.
        const span = Math.max(CH, tplSize - CH);
        let pos = (i * 7919 * CH) % span;
        pos -= pos % CH;
        for (let tries = 0; tries < 256; tries++) {
          fs.readSync(tfd, buf, 0, CH, pos);
          let full = true;
          for (let b = 0; b < CH && full; b += 4096) full = buf.subarray(b, b + 4096).some((x) => x !== 0);
          if (full) break;
          pos = (pos + 37 * CH) % span;
          pos -= pos % CH;
        }
      }
      fs.writeSync(fd, buf, 0, Math.min(CH, s.usedBytes - off), off);
    }
    fs.closeSync(tfd);
    fs.rmSync(tplRaw, { force: true });
  } finally {
    fs.closeSync(fd);
  }
  await run('qemu-img', ['convert', '-O', 'qcow2', raw, file]);
  fs.rmSync(raw, { force: true });
}
