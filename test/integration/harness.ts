// Integration harness: a real `ferry agent run` process on a private data dir and port, driven
// through the real CLI and HTTP API. Needs the guest image (./run-tests builds it first) and
// fails loudly without it: integration tests never skip silently.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { AgentClient } from '../../src/cli/client.js';
import { DEFAULT_IMAGES_DIR, GUEST_IMAGE, removeRamFiles } from '../../src/config.js';
import { readImage, type ResolvedImage } from '../../src/image/catalog.js';
import { waitFor as utilWaitFor } from '../../src/util/wait.js';

export const repo = path.resolve(__dirname, '../..');
export const cliJs = path.join(repo, 'dist/cli/main.js');

export function guestImage(): ResolvedImage {
  if (!fs.existsSync(cliJs)) throw new Error(`${cliJs} is missing: build first (./run-tests does)`);
  return readImage(DEFAULT_IMAGES_DIR, GUEST_IMAGE); // throws IMAGE_NOT_FOUND with the fix in its message
}

export async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export { sleep } from '../../src/util/wait.js';

/** util/wait's waitFor, also taking `false` as "not yet" (handy for boolean conditions). */
export function waitFor<T>(what: string, ms: number, fn: () => Promise<T | undefined | false> | T | undefined | false): Promise<T> {
  return utilWaitFor(what, ms, async () => {
    const v = await fn();
    return v === false ? undefined : (v as T | undefined);
  });
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export class TestAgent {
  proc: ChildProcess | undefined;
  api: AgentClient;
  log = '';

  private constructor(readonly dataDir: string, readonly port: number) {
    this.api = new AgentClient({ dataDir });
  }

  /** Initializes a fresh data dir (short path: unix socket names must fit) and starts the agent. */
  static async create(): Promise<TestAgent> {
    guestImage();
    const dataDir = fs.mkdtempSync('/tmp/fit-');
    const port = await freePort();
    const a = new TestAgent(dataDir, port);
    // Its own transport port too: the default (0.0.0.0:7451) may belong to a real agent here.
    const r = a.cli(['agent', 'init', '--listen', `127.0.0.1:${port}`, '--transport-listen', `127.0.0.1:${await freePort()}`, '--host-name', 'itest']);
    if (r.code !== 0) throw new Error(`agent init failed: ${r.stderr}`);
    await a.start();
    return a;
  }

  async start(): Promise<void> {
    this.api = new AgentClient({ dataDir: this.dataDir });
    const p = spawn(process.execPath, [cliJs, '--data-dir', this.dataDir, 'agent', 'run'], { stdio: ['ignore', 'pipe', 'pipe'] });
    p.stdout!.on('data', (d) => (this.log += d));
    p.stderr!.on('data', (d) => (this.log += d));
    this.proc = p;
    await waitFor('the agent API', 60_000, async () => {
      if (p.exitCode !== null) throw new Error(`agent exited: ${this.log}`);
      return this.api.get('/v1/host');
    });
  }

  /** Stops the agent with `signal` (SIGKILL simulates a crash); VMs keep running. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
  }

  cli(args: string[]): CliResult {
    const r = spawnSync(process.execPath, [cliJs, '--data-dir', this.dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }

  /** Every QEMU process running a VM of this data dir (there must never be two for one VM). */
  qemuPids(uuid: string): number[] {
    const out: number[] = [];
    for (const d of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(d)) continue;
      try {
        const argv = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
        const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
        if (argv.includes(uuid) && argv.some((a) => a.includes('qemu-system')) && !/^\d+ \(.*\) Z/.test(stat)) out.push(Number(d));
      } catch {
        /* raced with exit */
      }
    }
    return out;
  }

  /** Stops the agent, kills any QEMU it left, and removes the data dir. */
  async destroy(): Promise<void> {
    try {
      for (const v of (await this.api.get<{ name: string }[]>('/v1/vms').catch(() => [])) ?? []) {
        await this.api.del(`/v1/vms/${v.name}?force=true`).catch(() => {});
      }
    } finally {
      await this.stop('SIGTERM');
      spawnSync('pkill', ['-9', '-f', `${this.dataDir}/run/`]);
      removeRamFiles(this.dataDir);
      fs.rmSync(this.dataDir, { recursive: true, force: true });
    }
  }
}
