// Why this file exists: one running QEMU process and everything attached to it — its pid, its
// QMP connection and its serial reader — behind a small API (pause, resume, powerdown, quit,
// kill) and one 'exit' event that fires exactly once with the reason. QEMU is spawned detached
// so it outlives an agent restart; `attach` re-adopts such a process by pid + QMP socket, after
// checking that the pid really is that VM's QEMU (its argv carries the VM's uuid).
import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { QEMU_BIN } from './accel.js';
import type { VmPaths } from './cmdline.js';
import { QmpClient, type QmpEvent } from './qmp.js';
import { SerialReader } from './serial.js';

export interface ExitInfo {
  /** true when QEMU exited because Ferry asked it to (quit/powerdown/kill during stop). */
  expected: boolean;
  /** Guest-initiated shutdown seen on QMP before exit. */
  guestShutdown: boolean;
  reason: string;
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** True if `pid` is a live QEMU whose command line carries `uuid`. */
export function isQemuFor(pid: number, uuid: string): boolean {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.includes(uuid) && argv.some((a) => a.includes('qemu-system'));
  } catch {
    return false;
  }
}

function logTail(file: string, lines = 5): string {
  try {
    const all = fs.readFileSync(file, 'utf8').trim().split('\n');
    const since = all.map((l) => l.startsWith('--- ')).lastIndexOf(true);
    return all.slice(since + 1).slice(-lines).join(' | ');
  } catch {
    return '';
  }
}

export class QemuInstance extends EventEmitter {
  private exited = false;
  private expectExit = false;
  private guestShutdown = false;
  private poll: NodeJS.Timeout | undefined;

  private constructor(
    readonly pid: number,
    readonly qmp: QmpClient,
    readonly serial: SerialReader,
    readonly paths: VmPaths,
  ) {
    super();
    qmp.on('event', (ev: QmpEvent) => {
      if (ev.event === 'SHUTDOWN' && ev.data.guest === true) this.guestShutdown = true;
      this.emit('qmp-event', ev);
    });
    qmp.on('close', () => this.watchForExit());
    this.poll = setInterval(() => {
      if (!pidAlive(this.pid)) this.markExited();
    }, 1000);
    this.poll.unref();
  }

  /** Spawns QEMU detached, waits for its QMP and serial sockets, and attaches to both. */
  static async launch(args: string[], paths: VmPaths): Promise<QemuInstance> {
    for (const f of [paths.qmpSocket, paths.serialSocket, paths.pidFile]) fs.rmSync(f, { force: true });
    const log = fs.openSync(paths.qemuLog, 'a');
    fs.writeSync(log, `\n--- ${new Date().toISOString()} ${QEMU_BIN} ${args.join(' ')}\n`);
    const child = spawn(QEMU_BIN, args, { detached: true, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    let spawnError: Error | undefined;
    let earlyExit: string | undefined;
    child.on('error', (e) => (spawnError = e));
    child.on('exit', (code, signal) => (earlyExit = signal ? `killed by ${signal}` : `exit code ${code}`));
    child.unref();
    const pid = child.pid;
    if (pid === undefined) throw new FerryError('QEMU_FAILED', `cannot start ${QEMU_BIN}: ${spawnError?.message ?? 'spawn failed'}`);
    try {
      const qmp = await QmpClient.connect(paths.qmpSocket, { connectTimeoutMs: 20_000 });
      const serial = new SerialReader(paths.serialSocket);
      await serial.attach(5000);
      const inst = new QemuInstance(pid, qmp, serial, paths);
      child.on('exit', (code, signal) => inst.markExited(signal ? `killed by ${signal}` : `exit code ${code}`));
      return inst;
    } catch (e) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
      await new Promise((r) => setTimeout(r, 100));
      const why = earlyExit ?? spawnError?.message ?? (e as Error).message;
      throw new FerryError('QEMU_FAILED', `QEMU failed to start (${why}): ${logTail(paths.qemuLog)}`, { cause: e });
    }
  }

  /** Re-adopts a QEMU started by an earlier agent. Throws if it is gone or not that VM's. */
  static async attach(pid: number, uuid: string, paths: VmPaths): Promise<QemuInstance> {
    if (!pidAlive(pid) || !isQemuFor(pid, uuid)) {
      throw new FerryError('QMP_DISCONNECTED', `QEMU pid ${pid} for VM ${uuid} is not running`);
    }
    const qmp = await QmpClient.connect(paths.qmpSocket, { connectTimeoutMs: 5000 });
    const serial = new SerialReader(paths.serialSocket);
    await serial.attach(5000);
    return new QemuInstance(pid, qmp, serial, paths);
  }

  get hasExited(): boolean {
    return this.exited;
  }

  async status(): Promise<{ running: boolean; status: string }> {
    return this.qmp.execute<{ running: boolean; status: string }>('query-status');
  }

  pause(): Promise<unknown> {
    return this.qmp.execute('stop');
  }

  resume(): Promise<unknown> {
    return this.qmp.execute('cont');
  }

  /** ACPI power button: a cooperative guest shuts down. */
  powerdown(): Promise<unknown> {
    this.expectExit = true;
    return this.qmp.execute('system_powerdown');
  }

  /** Asks QEMU to exit now, then SIGKILL if it has not after `graceMs`. Resolves once it is gone. */
  async quit(graceMs = 5000): Promise<void> {
    this.expectExit = true;
    if (this.exited) return;
    try {
      await this.qmp.execute('quit', undefined, graceMs);
    } catch {
      /* QEMU may close QMP before answering */
    }
    if (!(await this.waitExit(graceMs))) {
      this.kill();
      await this.waitExit(5000);
    }
  }

  kill(): void {
    this.expectExit = true;
    try {
      process.kill(this.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }

  /** Resolves true when QEMU has exited, false after `ms`. */
  waitExit(ms: number): Promise<boolean> {
    if (this.exited) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.off('exit', onExit);
        resolve(false);
      }, ms);
      const onExit = () => {
        clearTimeout(t);
        resolve(true);
      };
      this.once('exit', onExit);
    });
  }

  /** Detaches without stopping QEMU (agent shutdown: the VM keeps running). */
  detach(): void {
    if (this.poll) clearInterval(this.poll);
    this.exited = true; // no exit event from a detached instance
    this.serial.close();
    this.qmp.removeAllListeners('close');
    this.qmp.close();
  }

  private watchForExit(): void {
    // QMP closed: QEMU is exiting (or crashed). Confirm with the pid, briefly.
    const started = Date.now();
    const check = () => {
      if (!pidAlive(this.pid) || isZombie(this.pid)) return this.markExited();
      if (Date.now() - started < 10_000) setTimeout(check, 100);
    };
    check();
  }

  private markExited(how?: string): void {
    if (this.exited) return;
    this.exited = true;
    if (this.poll) clearInterval(this.poll);
    this.serial.close();
    this.qmp.close();
    const tail = logTail(this.paths.qemuLog, 3);
    const info: ExitInfo = {
      expected: this.expectExit,
      guestShutdown: this.guestShutdown,
      reason: this.expectExit
        ? 'stopped by Ferry'
        : this.guestShutdown
          ? 'guest shut down'
          : `QEMU exited unexpectedly${how ? ` (${how})` : ''}${tail ? `: ${tail}` : ''}`,
    };
    this.emit('exit', info);
  }
}

function isZombie(pid: number): boolean {
  try {
    return /^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
