// Why this file exists: operators type sizes and rates as "512M", "1G", "100K"; the API carries
// plain integers. Parsing and printing live here so every command agrees on what "1G" means
// (binary units: K = 1024).
import { FerryError } from '../errors.js';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** Parses "512M", "1G", "4096", "1.5G" (binary units) into bytes. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) throw new FerryError('INVALID_ARGUMENT', `${what}: cannot parse "${text}" (use e.g. 512M, 1G, 4096)`);
  const n = Number(m[1]) * UNITS[(m[2] ?? '').toUpperCase()]!;
  if (!Number.isFinite(n)) throw new FerryError('INVALID_ARGUMENT', `${what}: "${text}" is too large`);
  return Math.round(n);
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
}

/**
 * Parses a link rate: "10Mbit", "100mbit", "1.5Gbit" (decimal bits/s, as links are sold) or a
 * byte rate "2M", "512K" (binary bytes/s, as virsh's --bandwidth). Returns bytes/s.
 */
export function parseRate(text: string, what = 'rate'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit(?:\/s|ps)?\s*$/i.exec(text);
  if (m) return Math.round((Number(m[1]) * ({ '': 1, k: 1e3, m: 1e6, g: 1e9 } as Record<string, number>)[m[2]!.toLowerCase()]!) / 8);
  return parseSize(text.replace(/\/s$/, ''), what);
}
