// Why this file exists: the named link profiles every WAN test and benchmark refers to, and the
// parsing of link settings typed by operators ("10mbit", "50ms", "1%").
import { FerryError } from '../errors.js';
import type { LinkParams } from './link.js';

export interface Outage {
  /** seconds after the trigger (lab up, or the benchmark's chosen moment) */
  afterSeconds: number;
  seconds: number;
  /** after the outage, forget every flow carried before it (NAT/stateful firewall flap) */
  flap: boolean;
}

export interface Profile {
  name: string;
  description: string;
  link: LinkParams;
  outage?: Outage;
}

/** Drop-tail buffer: 100 ms of the link's rate, at least 64 KiB. */
export function defaultQueue(rateBps: number): number {
  return rateBps ? Math.max(64 * 1024, Math.round((rateBps / 8) * 0.1)) : 64 * 1024 * 1024;
}

function link(rateBps: number, delayMs: number, loss: number): LinkParams {
  return { rateBps, delayMs, jitterMs: 0, loss, ge: null, reorder: 0, queueBytes: defaultQueue(rateBps) };
}

export const PROFILES: Record<string, Profile> = {
  lan: { name: 'lan', description: '1 Gbit/s, 0.25 ms one-way', link: link(1e9, 0.25, 0) },
  'wan-100': { name: 'wan-100', description: '100 Mbit/s, 25 ms one-way, 0.1 % loss', link: link(100e6, 25, 0.001) },
  'wan-10': { name: 'wan-10', description: '10 Mbit/s, 50 ms one-way, 1 % loss', link: link(10e6, 50, 0.01) },
  'wan-10-outage': {
    name: 'wan-10-outage',
    description: 'wan-10 with a 20 s outage during the transfer',
    link: link(10e6, 50, 0.01),
    outage: { afterSeconds: 30, seconds: 20, flap: false },
  },
  'wan-10-flap': {
    name: 'wan-10-flap',
    description: 'wan-10 with a 20 s outage after which every flow carried before is dropped for good',
    link: link(10e6, 50, 0.01),
    outage: { afterSeconds: 30, seconds: 20, flap: true },
  },
};

export function profile(name: string): Profile {
  const p = PROFILES[name];
  if (!p) throw new FerryError('INVALID_ARGUMENT', `unknown profile "${name}" (known: ${Object.keys(PROFILES).join(', ')})`);
  return structuredClone(p);
}

/** "10mbit", "1gbit", "512kbit", "100000" (bit/s). */
export function parseRate(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?(?:\/s|ps)?\s*$/i.exec(text);
  if (!m) throw new FerryError('INVALID_ARGUMENT', `rate: cannot parse "${text}" (use e.g. 10mbit, 1gbit, 512kbit)`);
  const mult = { bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9 }[(m[2] ?? 'bit').toLowerCase() as 'bit'];
  return Number(m[1]) * mult;
}

/** "50ms", "0.25ms", "1s", "50" (ms). */
export function parseMs(text: string, what = 'time'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?\s*$/i.exec(text);
  if (!m) throw new FerryError('INVALID_ARGUMENT', `${what}: cannot parse "${text}" (use e.g. 50ms, 1s)`);
  const mult = { us: 0.001, ms: 1, s: 1000 }[(m[2] ?? 'ms').toLowerCase() as 'ms'];
  return Number(m[1]) * mult;
}

/** "1%", "0.001" (fraction). */
export function parseProbability(text: string, what = 'probability'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(%)?\s*$/.exec(text);
  const v = m ? Number(m[1]) / (m[2] ? 100 : 1) : NaN;
  if (!(v >= 0 && v <= 1)) throw new FerryError('INVALID_ARGUMENT', `${what}: "${text}" is not a probability (use e.g. 1% or 0.01)`);
  return v;
}
