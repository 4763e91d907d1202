// Why this file exists: one place that runs external programs (qemu-img, apt-get, debootstrap,
// gcc, …) with a bounded time, captured output, and a FerryError carrying the tail of stderr.
import { spawn } from 'node:child_process';
import { FerryError } from '../errors.js';

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  /** Stream the child's output to ours (for long steps the operator should watch). */
  inherit?: boolean;
  input?: Buffer | string;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

/** Runs a program; resolves with its output when it exits 0, throws COMMAND_FAILED otherwise. */
export async function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await runAllowFail(cmd, args, opts);
  if (r.code !== 0) {
    const tail = (r.stderr || r.stdout).trim().split('\n').slice(-8).join('\n');
    throw new FerryError('COMMAND_FAILED', `${cmd} ${args.join(' ')} exited with ${r.code}${tail ? `:\n${tail}` : ''}`, {
      details: { command: cmd, exitCode: r.code },
    });
  }
  return r;
}

/** Runs a program and resolves with its exit code whatever it is (spawn errors become code 127). */
export function runAllowFail(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', opts.inherit ? 'inherit' : 'pipe', opts.inherit ? 'inherit' : 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    let timer: NodeJS.Timeout | undefined;
    if (opts.timeoutMs) {
      timer = setTimeout(() => {
        stderr += `\n(killed after ${opts.timeoutMs} ms)`;
        child.kill('SIGKILL');
      }, opts.timeoutMs);
    }
    child.on('error', (e) => {
      if (timer) clearTimeout(timer);
      resolve({ stdout, stderr: stderr + String(e), code: 127 });
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      resolve({ stdout, stderr, code: code ?? (signal ? 128 : 1) });
    });
  });
}

/** True when `cmd` is on PATH. */
export async function have(cmd: string): Promise<boolean> {
  const r = await runAllowFail('sh', ['-c', `command -v ${cmd}`]);
  return r.code === 0;
}
