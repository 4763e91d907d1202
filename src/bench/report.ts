// Why this file exists: turning a benchmark report into what people read — a markdown table
// (one row per contender, ratios against the best native run) and an SVG plot of wire bytes
// over time for every run — and writing them with the JSON into one results folder.
import fs from 'node:fs';
import path from 'node:path';
import { profile } from '../lab/profiles.js';
import type { BenchReport, RunResult } from './migrate.js';

const mib = (b?: number) => (b === undefined ? '–' : (b / 2 ** 20).toFixed(0));
const sec = (s?: number) => (s === undefined ? '–' : s.toFixed(0));

export function markdownTable(r: BenchReport): string {
  const s = r.scenario;
  const p = profile(s.profile);
  const okNative = r.runs.filter((x) => x.ok && x.contender.startsWith('native/'));
  const best = okNative.sort((a, b) => a.totalSec! - b.totalSec!)[0];
  const lines = [
    `Scenario: ${s.profile} (${p.description}), TCP ${s.cc} on both ends; native runs suspend the guest after ${s.suspendAfterSec ?? 'never'} s if not converged (libvirt --timeout); VM ${s.memoryMiB} MiB RAM, data disk ${mib(s.diskBytes)} MiB with ${mib(s.usedBytes)} MiB used, guest writing ${(s.writeRate / 1024).toFixed(0)} KiB/s and dirtying ${s.dirtyMiB} MiB of RAM, heartbeat ${s.heartbeatHz ?? 10} Hz (guest-seen downtime = largest heartbeat gap); seed ${s.seed}; ${r.startedAt}.`,
    '',
    '| contender | result | total (s) | guest-seen downtime (ms) | QEMU downtime (ms) | wire → (MiB) | wire ← (MiB) | link-limit (s) | re-sent | integrity | vs best native (time) |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const x of r.runs) {
    const integ = x.integrity ? `${x.integrity.disksEqual ? 'disks equal' : `${x.integrity.differingBlocks} blocks differ`}, ${x.integrity.recordsOk ? `records ≤ ${x.integrity.durableSeq} OK` : 'records FAIL'}` : '–';
    const ratio = best && x.ok ? (x.totalSec! / best.totalSec!).toFixed(2) : '–';
    const note = x.suspendedAtSec !== undefined ? ` (guest suspended at ${x.suspendedAtSec.toFixed(0)} s, libvirt --timeout)` : '';
    lines.push(`| ${x.contender}${note} | ${x.ok ? 'ok' : `FAILED: ${(x.error ?? '').replace(/\|/g, '/').slice(0, 120)}`} | ${sec(x.totalSec)} | ${x.guestDowntimeMs === undefined ? '–' : Math.round(x.guestDowntimeMs)} | ${x.qemuDowntimeMs ?? '–'} | ${mib(x.wireBytesFwd)} | ${mib(x.wireBytesRev)} | ${sec(x.linkLimitSec)} | ${x.resentPct === undefined ? '–' : `${x.resentPct.toFixed(1)} %`} | ${integ} | ${ratio} |`);
  }
  return lines.join('\n');
}

export function svgPlot(r: BenchReport): string {
  const W = 760;
  const H = 380;
  const m = { l: 60, r: 20, t: 30, b: 45 };
  const runs = r.runs.filter((x) => x.samples.length);
  const maxT = Math.max(1, ...runs.flatMap((x) => x.samples.map((s) => s.t)));
  const maxB = Math.max(1, ...runs.flatMap((x) => x.samples.map((s) => s.wireFwd))) / 2 ** 20;
  const X = (t: number) => m.l + (t / maxT) * (W - m.l - m.r);
  const Y = (b: number) => H - m.b - (b / maxB) * (H - m.t - m.b);
  const colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e'];
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="18" text-anchor="middle" font-size="14">Migration progress on ${r.scenario.profile}: bytes on the wire (source → destination)</text>`,
    `<line x1="${m.l}" y1="${H - m.b}" x2="${W - m.r}" y2="${H - m.b}" stroke="black"/>`,
    `<line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${H - m.b}" stroke="black"/>`,
    `<text x="${W / 2}" y="${H - 10}" text-anchor="middle">time (s)</text>`,
    `<text x="15" y="${H / 2}" transform="rotate(-90 15 ${H / 2})" text-anchor="middle">MiB</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const t = (maxT * i) / 5;
    const b = (maxB * i) / 5;
    parts.push(`<text x="${X(t)}" y="${H - m.b + 15}" text-anchor="middle">${t.toFixed(0)}</text>`);
    parts.push(`<text x="${m.l - 5}" y="${Y(b) + 4}" text-anchor="end">${b.toFixed(0)}</text>`);
  }
  runs.forEach((x, i) => {
    const pts = x.samples.map((s) => `${X(s.t).toFixed(1)},${Y(s.wireFwd / 2 ** 20).toFixed(1)}`).join(' ');
    parts.push(`<polyline fill="none" stroke="${colors[i % colors.length]}" stroke-width="2" points="${pts}"/>`);
    parts.push(`<text x="${m.l + 10}" y="${m.t + 15 + i * 15}" fill="${colors[i % colors.length]}">${x.contender}${x.ok ? '' : ' (failed)'}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}

export function writeReport(r: BenchReport, dir: string): { json: string; md: string; svg: string } {
  fs.mkdirSync(dir, { recursive: true });
  const files = { json: path.join(dir, 'result.json'), md: path.join(dir, 'table.md'), svg: path.join(dir, 'progress.svg') };
  fs.writeFileSync(files.json, JSON.stringify(r, null, 2));
  fs.writeFileSync(files.md, markdownTable(r) + '\n');
  fs.writeFileSync(files.svg, svgPlot(r));
  return files;
}

export type { RunResult };
