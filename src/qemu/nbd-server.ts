// Why this file exists: a qcow2 image that no QEMU runs (a restore target, an export) served
// over NBD by `qemu-nbd` on a unix socket, so Ferry's NBD client can write it. Only src/qemu/
// spawns QEMU's programs.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { sleep } from '../util/wait.js';

export interface ImageServer {
  socket: string;
  close(): Promise<void>;
}

export async function serveImage(file: string, socket: string, o: { readOnly?: boolean } = {}): Promise<ImageServer> {
  fs.rmSync(socket, { force: true });
  const p = spawn('qemu-nbd', ['--format=qcow2', `--socket=${socket}`, '--cache=writeback', '--discard=unmap', '--persistent', ...(o.readOnly ? ['--read-only'] : []), file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<void>((r) => p.once('exit', () => r()));
  for (let i = 0; i < 500 && !fs.existsSync(socket); i++) {
    if (p.exitCode !== null) break;
    await sleep(10);
  }
  if (!fs.existsSync(socket)) {
    p.kill('SIGKILL');
    throw new FerryError('COMMAND_FAILED', `qemu-nbd could not serve ${file}: ${err.trim() || 'no socket after 5 s'}`);
  }
  return {
    socket,
    close: async () => {
      if (p.exitCode === null) p.kill('SIGTERM');
      await exited;
      fs.rmSync(socket, { force: true });
    },
  };
}
