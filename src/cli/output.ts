// Why this file exists: how the CLI prints — aligned tables for people, JSON for scripts
// (--json), and errors as "error [CODE]: message" with the code's exit status.
import { ERROR_CODES, asFerryError } from '../errors.js';

export function table(rows: Record<string, unknown>[], cols: string[]): string {
  if (rows.length === 0) return '(none)';
  const cells = rows.map((r) => cols.map((c) => String(r[c] ?? '')));
  const widths = cols.map((c, i) => Math.max(c.length, ...cells.map((row) => row[i]!.length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(cols.map((c) => c.toUpperCase())), ...cells.map(line)].join('\n');
}

export function printJson(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + '\n');
}

export function fail(e: unknown, json: boolean): never {
  const err = asFerryError(e);
  if (json) process.stderr.write(JSON.stringify({ error: err.toJSON() }) + '\n');
  else process.stderr.write(`error [${err.code}]: ${err.message}\n`);
  if (err.code === 'INTERNAL' && process.env.FERRY_DEBUG) process.stderr.write(`${(e as Error)?.stack}\n`);
  process.exit(ERROR_CODES[err.code].exit);
}
