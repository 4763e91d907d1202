// Why this file exists: what every CLI command shares — the global flags, the agent client
// built from them, and the action wrapper that turns errors into "error [CODE]" + exit status.
import type { Command } from 'commander';
import { AgentClient } from './client.js';
import { fail } from './output.js';

export interface Globals {
  dataDir: string;
  host?: string;
  token?: string;
  json?: boolean;
}

export function globals(cmd: Command): Globals {
  return cmd.optsWithGlobals() as Globals;
}

export function client(cmd: Command): AgentClient {
  const g = globals(cmd);
  return new AgentClient({ dataDir: g.dataDir, ...(g.host ? { host: g.host } : {}), ...(g.token ? { token: g.token } : {}) });
}

/** Wraps an action: errors print as "error [CODE]" (or JSON with --json) and set the exit status. */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void) {
  return async (...args: A) => {
    const cmd = args[args.length - 1] as Command;
    try {
      await fn(...args);
    } catch (e) {
      fail(e, !!globals(cmd).json);
    }
  };
}

export const say = (m: string) => process.stdout.write(`${m}\n`);
