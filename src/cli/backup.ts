// Why this file exists: `ferry backup …` and `ferry store …`. Creating a backup and restoring it
// touch a VM, so they are agent jobs this command follows with a progress bar (rate, ETA).
// Everything else reads or changes only a store directory and opens it here directly (the
// store's writer lock keeps a prune or gc from colliding with a running backup).
import path from 'node:path';
import type { Command } from 'commander';
import { writeImage, type ImageFormat } from '../backup/restore.js';
import { selectKept } from '../backup/prune.js';
import { files } from '../config.js';
import { FerryError } from '../errors.js';
import { openStore, storeInit, type ChunkStore } from '../store/store.js';
import { formatBytes, formatDuration } from '../util/units.js';
import { sleep } from '../util/wait.js';
import type { JobView } from '../agent/jobs.js';
import type { AgentClient } from './client.js';
import { action, client, globals, say } from './common.js';
import { printJson, table } from './output.js';

interface StoreOpts {
  store?: string;
  keyFile?: string;
}

function storeDir(cmd: Command, o: StoreOpts, arg?: string): string {
  return path.resolve(arg ?? o.store ?? files(globals(cmd).dataDir).store);
}

function openHere(cmd: Command, o: StoreOpts, write = false, arg?: string): ChunkStore {
  return openStore(storeDir(cmd, o, arg), { ...(o.keyFile ? { keyFile: path.resolve(o.keyFile) } : {}), write });
}

function bar(frac: number, width = 28): string {
  const n = Math.max(0, Math.min(width, Math.round(frac * width)));
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}]`;
}

function progress(done: number, total: number, startedAt: number, bytesPerSec: number, etaSec: number | null, what: string): string {
  const frac = total ? done / total : 0;
  return `${formatDuration(Date.now() - startedAt)} ${what} ${bar(frac)} ${Math.round(frac * 100)}% ${formatBytes(done)}/${formatBytes(total)} @ ${formatBytes(bytesPerSec)}/s${etaSec !== null ? ` ETA ${formatDuration(etaSec * 1000)}` : ''}`;
}

/** Follows an agent job to its end, drawing a progress bar (not with --json); throws the job's error. */
export async function followJob(api: AgentClient, id: string, json: boolean): Promise<JobView> {
  const tty = process.stdout.isTTY && !json;
  for (;;) {
    const j = await api.get<JobView>(`/v1/jobs/${id}`);
    if (tty) process.stdout.write(`\r\x1b[K${progress(j.progress.doneBytes, j.progress.totalBytes, j.startedAt, j.progress.bytesPerSec, j.progress.etaSec, j.phase)}`);
    if (j.state !== 'running') {
      if (tty) process.stdout.write('\n');
      if (j.error) throw new FerryError(j.error.code as never, j.error.message);
      return j;
    }
    await sleep(json ? 1000 : 250);
  }
}

/** A local progress printer for work done in this process. */
function localProgress(json: boolean, what: string) {
  const t0 = Date.now();
  const tty = process.stdout.isTTY && !json;
  return {
    tick: (done: number, total: number) => {
      if (!tty) return;
      const s = (Date.now() - t0) / 1000;
      const r = s > 0.2 ? done / s : 0;
      process.stdout.write(`\r\x1b[K${progress(done, total, t0, r, r ? Math.round((total - done) / r) : null, what)}`);
    },
    end: () => tty && process.stdout.write('\n'),
  };
}

const storeOptions = (c: Command) => c.option('--store <dir>', 'chunk store directory (default: <data-dir>/store)').option('--key-file <file>', 'key of an encrypted store');

export function registerBackupCommands(program: Command): void {
  const st = program.command('store').description('content-addressed chunk stores: init, info, gc, verify');
  st.command('init')
    .description('create a chunk store in an empty (or new) directory')
    .argument('<dir>')
    .option('--key-file <file>', 'encrypt chunks at rest (AES-256-GCM) with this key; created (random, mode 0600) if absent')
    .action(
      action((dir: string, o: { keyFile?: string }, cmd: Command) => {
        const cfg = storeInit(path.resolve(dir), o.keyFile ? { keyFile: path.resolve(o.keyFile) } : {});
        if (globals(cmd).json) return printJson({ dir: path.resolve(dir), ...cfg });
        say(`store created in ${path.resolve(dir)}${cfg.encrypted ? ` (encrypted; keep ${o.keyFile} safe: without it nothing can be restored)` : ''}`);
      }),
    );
  storeOptions(st.command('info').description('chunks, bytes, dedup, backups').argument('[dir]')).action(
    action((dir: string | undefined, o: StoreOpts, cmd: Command) => {
      const s = openHere(cmd, o, false, dir);
      const i = s.info();
      s.close();
      if (globals(cmd).json) return printJson(i);
      say(`${i.dir}${i.encrypted ? ' (encrypted)' : ''}\n  backups ${i.backups} of ${i.vms} VM(s)\n  chunks ${i.chunks} (${i.unreferenced} unreferenced: \`ferry store gc\` frees them)\n  stored ${formatBytes(i.storedBytes)} for ${formatBytes(i.plainBytes)} of distinct data`);
    }),
  );
  storeOptions(st.command('gc').description('delete chunks no backup references, and what an interrupted writer left').argument('[dir]')).action(
    action((dir: string | undefined, o: StoreOpts, cmd: Command) => {
      const s = openHere(cmd, o, true, dir);
      try {
        const r = s.gc();
        if (globals(cmd).json) return printJson(r);
        say(`freed ${r.chunks} chunk(s) and ${r.orphans} orphaned file(s): ${formatBytes(r.bytes)}`);
      } finally {
        s.close();
      }
    }),
  );
  storeOptions(st.command('verify').description('read every referenced chunk and check it against its id').argument('[dir]')).action(
    action((dir: string | undefined, o: StoreOpts, cmd: Command) => verifyCmd(openHere(cmd, o, false, dir), undefined, cmd)),
  );

  const bk = program.command('backup').description('full and incremental backups of running VMs into a chunk store');
  storeOptions(bk.command('create').description('back up a running VM (crash-consistent at one instant; incremental once a full exists)').argument('<vm>'))
    .option('--full', 'read every allocated block (the store still writes only chunks it lacks)')
    .option('--detach', 'start the backup and return its job id')
    .action(
      action(async (vm: string, o: StoreOpts & { full?: boolean; detach?: boolean }, cmd: Command) => {
        const g = globals(cmd);
        const api = client(cmd);
        const j = await api.post<JobView>(`/v1/vms/${encodeURIComponent(vm)}/backups`, { ...(o.store ? { store: path.resolve(o.store) } : {}), ...(o.keyFile ? { keyFile: path.resolve(o.keyFile) } : {}), full: !!o.full });
        if (o.detach) return void (g.json ? printJson(j) : say(`backup job ${j.id} started`));
        const done = await followJob(api, j.id, !!g.json);
        const r = done.result as { id: string; kind: string; bytesRead: number; bytesNew: number; durationMs: number; chunksNew: number; fullReason?: string };
        if (g.json) return printJson(r);
        say(`backup ${r.id} of ${vm}: ${r.kind}, read ${formatBytes(r.bytesRead)}, stored ${formatBytes(r.bytesNew)} new (${r.chunksNew} chunks) in ${formatDuration(r.durationMs)}${r.fullReason ? `\n  full because: ${r.fullReason}` : ''}`);
      }),
    );
  storeOptions(bk.command('list').description('backups in the store (of one VM)').argument('[vm]')).action(
    action((vm: string | undefined, o: StoreOpts, cmd: Command) => {
      const s = openHere(cmd, o);
      const rows = s.backups(vm);
      s.close();
      if (globals(cmd).json) return printJson(rows.map(({ spec: _s, ...r }) => r));
      say(table(rows.map((r) => ({ id: r.id, vm: r.vm, kind: r.kind, created: new Date(r.created).toISOString(), read: formatBytes(r.bytesRead), new: formatBytes(r.bytesNew), took: formatDuration(r.durationMs) })), ['id', 'vm', 'kind', 'created', 'read', 'new', 'took']));
    }),
  );
  storeOptions(bk.command('show').description('one backup: its disks and chunks').argument('<id>')).action(
    action((id: string, o: StoreOpts, cmd: Command) => {
      const s = openHere(cmd, o);
      const b = s.backup(id);
      const disks = s.disks(b.id).map((d) => {
        let data = 0;
        for (let i = 0; i < d.manifest.length; i += 32) if (d.manifest.readBigUInt64BE(i) || d.manifest.readBigUInt64BE(i + 8) || d.manifest.readBigUInt64BE(i + 16) || d.manifest.readBigUInt64BE(i + 24)) data++;
        return { disk: d.disk, sizeBytes: d.size, chunks: d.manifest.length / 32, dataChunks: data };
      });
      s.close();
      const out = { ...b, spec: JSON.parse(b.spec) as unknown, disks };
      if (globals(cmd).json) return printJson(out);
      say(`backup ${b.id}: VM ${b.vm}, ${b.kind}${b.parent ? ` (after ${b.parent})` : ''}, ${new Date(b.created).toISOString()}, took ${formatDuration(b.durationMs)}`);
      for (const d of disks) say(`  disk ${d.disk}: ${formatBytes(d.sizeBytes)}, ${d.dataChunks} of ${d.chunks} chunks hold data`);
    }),
  );
  storeOptions(bk.command('verify').description("read every chunk of a backup and check it; names damaged chunks").argument('<id>')).action(
    action((id: string, o: StoreOpts, cmd: Command) => {
      const s = openHere(cmd, o);
      return verifyCmd(s, s.backup(id).id, cmd);
    }),
  );
  storeOptions(bk.command('restore').description('restore a backup to a new VM (--name), or over its stopped VM (--in-place)').argument('<id>'))
    .option('--name <vm>', 'define a new VM with this name')
    .option('--in-place', 'replace the disks of the (stopped) VM the backup was taken of')
    .action(
      action(async (id: string, o: StoreOpts & { name?: string; inPlace?: boolean }, cmd: Command) => {
        const g = globals(cmd);
        if (!o.name === !o.inPlace) throw new FerryError('INVALID_ARGUMENT', 'backup restore: give --name NEW_VM or --in-place');
        const api = client(cmd);
        const j = await api.post<JobView>('/v1/backups/restore', { backup: id, ...(o.store ? { store: path.resolve(o.store) } : {}), ...(o.keyFile ? { keyFile: path.resolve(o.keyFile) } : {}), ...(o.name ? { name: o.name } : { inPlace: true }) });
        const done = await followJob(api, j.id, !!g.json);
        if (g.json) return printJson(done.result);
        say(`restored backup ${id} to VM ${(done.result as { name: string }).name} (stopped: \`ferry vm start ${(done.result as { name: string }).name}\`)`);
      }),
    );
  storeOptions(bk.command('prune').description("delete a VM's old backups by a retention policy (then `ferry store gc` frees space)").argument('<vm>'))
    .option('--keep-last <n>', 'keep the N newest')
    .option('--keep-daily <n>', 'keep the newest of each of the N most recent days with a backup')
    .option('--dry-run', 'only say what would go')
    .action(
      action((vm: string, o: StoreOpts & { keepLast?: string; keepDaily?: string; dryRun?: boolean }, cmd: Command) => {
        const num = (v: string | undefined, n: string) => {
          if (v === undefined) return undefined;
          if (!/^\d+$/.test(v)) throw new FerryError('INVALID_ARGUMENT', `${n} must be a whole number`);
          return Number(v);
        };
        const keepLast = num(o.keepLast, '--keep-last');
        const keepDaily = num(o.keepDaily, '--keep-daily');
        if (keepLast === undefined && keepDaily === undefined) throw new FerryError('INVALID_ARGUMENT', 'backup prune: give --keep-last and/or --keep-daily');
        const s = openHere(cmd, o, !o.dryRun);
        try {
          const { keep, remove } = selectKept(s.backups(vm), { ...(keepLast !== undefined ? { keepLast } : {}), ...(keepDaily !== undefined ? { keepDaily } : {}) });
          if (!o.dryRun) for (const b of remove) s.deleteBackup(b.id);
          if (globals(cmd).json) return printJson({ kept: keep.map((b) => b.id), removed: remove.map((b) => b.id), dryRun: !!o.dryRun });
          say(`${o.dryRun ? 'would remove' : 'removed'} ${remove.length} backup(s) of ${vm}, kept ${keep.length}${remove.length && !o.dryRun ? '; `ferry store gc` frees their chunks' : ''}`);
          for (const b of remove) say(`  - ${b.id}`);
        } finally {
          s.close();
        }
      }),
    );
  storeOptions(bk.command('export').description('write a backed-up disk to an image file').argument('<id>'))
    .requiredOption('--output <file>', 'the image to write (must not exist)')
    .option('--format <fmt>', 'raw or qcow2', 'qcow2')
    .option('--disk <n>', 'which disk (0 = the first)', '0')
    .action(
      action(async (id: string, o: StoreOpts & { output: string; format: string; disk: string }, cmd: Command) => {
        if (o.format !== 'raw' && o.format !== 'qcow2') throw new FerryError('INVALID_ARGUMENT', '--format must be raw or qcow2');
        if (!/^\d+$/.test(o.disk)) throw new FerryError('INVALID_ARGUMENT', '--disk must be a disk index');
        const s = openHere(cmd, o);
        const p = localProgress(!!globals(cmd).json, 'export');
        try {
          const b = s.backup(id);
          const r = await writeImage(s, b.id, Number(o.disk), path.resolve(o.output), o.format as ImageFormat, (x) => p.tick(x.doneBytes, x.totalBytes));
          p.end();
          if (globals(cmd).json) return printJson({ output: path.resolve(o.output), format: o.format, ...r });
          say(`wrote ${path.resolve(o.output)} (${o.format}, ${formatBytes(r.sizeBytes)}, ${formatBytes(r.dataBytes)} of data)`);
        } finally {
          s.close();
        }
      }),
    );
}

function verifyCmd(s: ChunkStore, backupId: string | undefined, cmd: Command): void {
  const json = !!globals(cmd).json;
  const p = localProgress(json, 'verify');
  try {
    const r = s.verify(backupId, (d, t) => p.tick(d, t));
    p.end();
    if (json) printJson({ ok: r.bad.length === 0, ...r });
    else {
      say(`checked ${r.checked} chunk(s): ${r.bad.length ? `${r.bad.length} DAMAGED` : 'all good'}`);
      for (const b of r.bad) say(`  chunk ${b.id}: ${b.error}\n    needed by backup(s): ${b.backups.join(', ') || 'none'}`);
    }
    if (r.bad.length) throw new FerryError('STORE_CORRUPT', `${r.bad.length} damaged chunk(s)${backupId ? ` in backup ${backupId}` : ''}: ${r.bad.map((b) => b.id.slice(0, 16)).join(', ')}`);
  } finally {
    s.close();
  }
}
