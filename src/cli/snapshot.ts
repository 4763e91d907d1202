// Why this file exists: `ferry snapshot create|list|revert|delete` — external snapshots of a VM,
// live, as a tree (src/agent/snapshots.ts does the work in the agent).
import type { Command } from 'commander';
import type { SnapshotView } from '../agent/snapshots.js';
import { formatBytes } from '../util/units.js';
import { action, client, globals, say } from './common.js';
import { printJson } from './output.js';

function tree(snaps: SnapshotView[], current: string | null): string {
  const lines: string[] = [];
  const walk = (parent: string | null, indent: string) => {
    for (const s of snaps.filter((x) => x.parent === parent)) {
      lines.push(`${indent}${s.name}${s.memory ? ' (+memory)' : ''}  ${new Date(s.createdAt).toISOString()}${s.name === current ? '  <- current (the VM runs on top of it)' : ''}`);
      walk(s.name, indent + '  ');
    }
  };
  walk(null, '');
  return lines.length ? lines.join('\n') : '(no snapshots)';
}

export function registerSnapshotCommands(program: Command): void {
  const sn = program.command('snapshot').description('external snapshots of a VM (disk, or disk + memory), as a tree');
  sn.command('create')
    .description('take a snapshot, live: disk-only (the guest pauses for the transaction only), or with --memory (RAM and device state too)')
    .argument('<vm>')
    .argument('<name>')
    .option('--memory', 'also save RAM and device state (the guest pauses while they are written: about 0.3 s per 256 MiB)')
    .action(
      action(async (vm: string, name: string, o: { memory?: boolean }, cmd: Command) => {
        const r = await client(cmd).post<{ name: string; pauseMs: number; memory: boolean; stateBytes?: number }>(`/v1/vms/${encodeURIComponent(vm)}/snapshots`, { name, memory: !!o.memory });
        if (globals(cmd).json) return printJson(r);
        say(`snapshot ${r.name} of ${vm}: ${r.memory ? `disk + memory (${formatBytes(r.stateBytes ?? 0)} of state)` : 'disk only'}, guest paused ${r.pauseMs} ms`);
      }),
    );
  sn.command('list')
    .description("a VM's snapshots as a tree")
    .argument('<vm>')
    .action(
      action(async (vm: string, _o: unknown, cmd: Command) => {
        const r = await client(cmd).get<{ current: string | null; snapshots: SnapshotView[] }>(`/v1/vms/${encodeURIComponent(vm)}/snapshots`);
        if (globals(cmd).json) return printJson(r);
        say(tree(r.snapshots, r.current));
      }),
    );
  sn.command('revert')
    .description('return the VM to a snapshot (memory too, when it has it); the present state is discarded unless a snapshot holds it')
    .argument('<vm>')
    .argument('<name>')
    .action(
      action(async (vm: string, name: string, _o: unknown, cmd: Command) => {
        const r = await client(cmd).post<{ name: string; state: string }>(`/v1/vms/${encodeURIComponent(vm)}/snapshots/${encodeURIComponent(name)}/revert`);
        if (globals(cmd).json) return printJson(r);
        say(`${vm} reverted to ${r.name}; it is ${r.state}`);
      }),
    );
  sn.command('delete')
    .description("delete a snapshot: its data is merged into the images above it (live if the VM runs)")
    .argument('<vm>')
    .argument('<name>')
    .action(
      action(async (vm: string, name: string, _o: unknown, cmd: Command) => {
        const r = await client(cmd).del<{ name: string; merged: number }>(`/v1/vms/${encodeURIComponent(vm)}/snapshots/${encodeURIComponent(name)}`);
        if (globals(cmd).json) return printJson(r);
        say(`snapshot ${r.name} of ${vm} deleted (${r.merged} image(s) took its data)`);
      }),
    );
}
