// Why this file exists: `ferry lab measure` and the lab's tests: run probe.ts's server in one lab
// host and its client in another, and return what the client saw (RTT, loss, rate, TCP goodput).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { distDir } from '../config.js';
import { FerryError } from '../errors.js';
import { run } from '../util/exec.js';
import { labHost, readLab, type LabHost } from './lab.js';

const probeJs = path.join(distDir, 'lab', 'probe-main.js');

export type ProbeKind = 'rtt' | 'loss' | 'rate' | 'tcp';

/** Runs one probe from host `from` to host `to` of lab `name`; resolves with its JSON result. */
export async function measure<T = Record<string, number>>(name: string, from: string, to: string, kind: ProbeKind, opts: Record<string, number> = {}): Promise<T> {
  const lab = readLab(name);
  const a: LabHost = labHost(lab, from);
  const b: LabHost = labHost(lab, to);
  const srv = spawn('ip', ['netns', 'exec', b.netns, process.execPath, probeJs, 'server'], { stdio: 'ignore' });
  try {
    await new Promise((r) => setTimeout(r, 400));
    const r = await run('ip', ['netns', 'exec', a.netns, process.execPath, probeJs, kind, b.wanIp, JSON.stringify(opts)], { timeoutMs: 600_000 });
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as T;
  } catch (e) {
    throw new FerryError('COMMAND_FAILED', `lab probe ${kind} ${from}→${to} failed: ${(e as Error).message}`, { cause: e });
  } finally {
    srv.kill('SIGKILL');
  }
}
