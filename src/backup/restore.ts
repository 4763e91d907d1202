// Why this file exists: turning a backed-up disk back into an image — a raw file, or a qcow2
// (written through qemu-nbd with Ferry's NBD client) — for `backup restore` and `backup export`.
// Every chunk is checked against its id as it is read (store.get); zero chunks stay holes.
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { serveImage } from '../qemu/nbd-server.js';
import { createBlank } from '../storage/qcow2.js';
import { STORE_CHUNK, ZERO_ID, type ChunkStore } from '../store/store.js';

export type ImageFormat = 'raw' | 'qcow2';

export interface WriteProgress {
  doneBytes: number;
  totalBytes: number;
}

/** Writes disk `disk` of backup `backupId` to `target` (which must not exist). */
export async function writeImage(store: ChunkStore, backupId: string, disk: number, target: string, format: ImageFormat, onProgress?: (p: WriteProgress) => void): Promise<{ sizeBytes: number; dataBytes: number }> {
  const d = store.disks(backupId).find((x) => x.disk === disk);
  if (!d) throw new FerryError('INVALID_ARGUMENT', `backup ${backupId} has no disk ${disk}`);
  if (fs.existsSync(target)) throw new FerryError('INVALID_ARGUMENT', `${target} already exists`);
  const n = d.manifest.length / 32;
  const data: number[] = [];
  for (let c = 0; c < n; c++) if (!d.manifest.subarray(c * 32, c * 32 + 32).equals(ZERO_ID)) data.push(c);
  const total = data.length * STORE_CHUNK;
  let done = 0;
  let last = 0;
  const tick = () => {
    done += STORE_CHUNK;
    if (onProgress && Date.now() - last > 250) {
      last = Date.now();
      onProgress({ doneBytes: done, totalBytes: total });
    }
  };
  const chunk = (c: number) => store.get(d.manifest.subarray(c * 32, c * 32 + 32));
  try {
    if (format === 'raw') {
      const fd = fs.openSync(target, 'wx');
      try {
        fs.ftruncateSync(fd, d.size);
        for (const c of data) {
          fs.writeSync(fd, chunk(c), 0, undefined, c * STORE_CHUNK);
          tick();
        }
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    } else {
      await createBlank(target, d.size);
      const srv = await serveImage(target, `${target}.nbd`);
      try {
        const nbd = await NbdClient.connect({ path: srv.socket }, '');
        const inflight: Promise<void>[] = [];
        for (const c of data) {
          inflight.push(nbd.write(c * STORE_CHUNK, chunk(c)));
          if (inflight.length >= 16) await inflight.shift();
          tick();
        }
        await Promise.all(inflight);
        await nbd.flush();
        await nbd.close();
      } finally {
        await srv.close();
      }
    }
  } catch (e) {
    fs.rmSync(target, { force: true });
    throw e;
  }
  onProgress?.({ doneBytes: total, totalBytes: total });
  return { sizeBytes: d.size, dataBytes: total };
}
