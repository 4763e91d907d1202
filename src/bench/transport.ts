// Why this file exists: `ferry bench transport` — pushes a realistic corpus (the guest's root
// disk: a Debian filesystem, zeros and all) from lab host h1 to h2 over the emulated link, once
// with Ferry's transport (mutual TLS, several streams, zstd, zero elision, dedup) and once as a
// single plain TCP stream, in the same run. Reports goodput (payload bytes / time), bytes on the
// wire (the emulator's counters), CPU, and the transport's resend figures; optional outage.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DEFAULT_IMAGES_DIR, distDir, files, GUEST_IMAGE } from '../config.js';
import { readImage } from '../image/catalog.js';
import { labCut, labDown, labUp, relayCommand, type LabState } from '../lab/lab.js';
import { profile as getProfile } from '../lab/profiles.js';
import type { RelayStatus } from '../lab/relay.js';
import { certFingerprint } from '../agent/identity.js';
import { trustHost } from '../transport/tls.js';
import { run } from '../util/exec.js';

export interface TransportRun {
  mode: 'ferry' | 'plain';
  ok: boolean;
  error?: string;
  payloadBytes: number;
  seconds?: number;
  goodputMbps?: number;
  wireBytes?: number;
  /** payload goodput / link rate (> 1 when reduction sends less than the payload) */
  linkShare?: number;
  /** bytes on the wire source → destination / (time × link rate): how full the link was kept */
  linkUtilization?: number;
  senderCpuSec?: number;
  receiverCpuSec?: number;
  resentFrames?: number;
  framesSent?: number;
  events?: string[];
  sha256Match?: boolean;
}

export interface TransportBench {
  profile: string;
  cc: string;
  corpus: 'root' | 'random';
  bytes: number;
  streams: number | 'auto';
  cut: { atSeconds: number; seconds: number; flap: boolean } | null;
  startedAt: string;
  runs: TransportRun[];
}

function inNs(ns: string, args: string[], timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const p = spawn('ip', ['netns', 'exec', ns, process.execPath, path.join(distDir, 'bench', 'transport-peer.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const t = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`timed out after ${timeoutMs} ms (${args[0]}): ${err.slice(-300)}`));
    }, timeoutMs);
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('exit', (code) => {
      clearTimeout(t);
      const line = out.trim().split('\n').pop();
      if (line) resolve(JSON.parse(line) as Record<string, unknown>);
      else reject(new Error(`${args[0]} exited ${code}: ${err.slice(-300)}`));
    });
  });
}

/**
 * The corpus and its SHA-256: `root` is the guest root disk as raw bytes (first `bytes`: ext4
 * metadata, Debian files, zeros); `random` is incompressible (measures the link use itself).
 */
async function corpus(bytes: number, kind: 'root' | 'random'): Promise<{ file: string; sha256: string }> {
  const file = path.join(os.tmpdir(), `ferry-corpus-${kind}-${bytes}.raw`);
  if (!fs.existsSync(file)) {
    const tmp = `${file}.tmp`;
    if (kind === 'root') {
      await run('qemu-img', ['convert', '-U', '-O', 'raw', readImage(DEFAULT_IMAGES_DIR, GUEST_IMAGE).root, tmp]);
      fs.truncateSync(tmp, bytes);
    } else {
      const fd = fs.openSync(tmp, 'w');
      for (let off = 0; off < bytes; off += 1 << 20) fs.writeSync(fd, crypto.randomBytes(Math.min(1 << 20, bytes - off)));
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  }
  const sha = (await run('sha256sum', [file])).stdout.split(' ')[0]!;
  return { file, sha256: sha };
}

async function once(lab: LabState, mode: 'ferry' | 'plain', o: { bytes: number; streams: number | 'auto'; cut: TransportBench['cut']; timeoutSec: number; corpus: { file: string; sha256: string } }): Promise<TransportRun> {
  const [h1, h2] = lab.hosts as [LabState['hosts'][0], LabState['hosts'][0]];
  const port = mode === 'ferry' ? 7601 : 7602;
  const r: TransportRun = { mode, ok: false, payloadBytes: o.bytes };
  await relayCommand(lab, { op: 'reset' });
  const recv = inNs(h2.netns, ['recv', String(port), mode, h2.dataDir], o.timeoutSec * 1000);
  await new Promise((res) => setTimeout(res, 700));
  if (o.cut) await labCut(lab.name, { seconds: o.cut.seconds, flap: o.cut.flap, inSeconds: o.cut.atSeconds });
  try {
    const [s, v] = await Promise.all([inNs(h1.netns, ['send', `${h2.wanIp}:${port}`, mode, h1.dataDir, o.corpus.file, String(o.bytes), String(o.streams)], o.timeoutSec * 1000), recv]);
    const st = await relayCommand<RelayStatus>(lab, { op: 'status' });
    const rate = st.directions['1>2']!.params.rateBps;
    r.seconds = Math.max(Number(s.seconds), Number(v.seconds));
    r.goodputMbps = (o.bytes * 8) / r.seconds / 1e6;
    r.wireBytes = st.directions['1>2']!.counters.bytes + st.directions['2>1']!.counters.bytes;
    r.linkShare = (r.goodputMbps * 1e6) / rate;
    r.linkUtilization = (st.directions['1>2']!.counters.deliveredBytes * 8) / r.seconds / rate;
    r.senderCpuSec = Number(s.cpuSec);
    r.receiverCpuSec = Number(v.cpuSec);
    const stats = s.stats as { framesResent: number; framesSent: number } | undefined;
    if (stats) {
      r.resentFrames = stats.framesResent;
      r.framesSent = stats.framesSent;
    }
    r.events = (s.events as string[] | undefined) ?? [];
    r.sha256Match = v.sha256 === o.corpus.sha256 && Number(v.bytes) === o.bytes;
    r.ok = r.sha256Match;
    if (!r.ok) r.error = `received ${String(v.bytes)} bytes, sha256 ${String(v.sha256).slice(0, 12)}… ≠ ${o.corpus.sha256.slice(0, 12)}…`;
  } catch (e) {
    r.error = (e as Error).message;
  }
  return r;
}

export async function benchTransport(o: { corpus: 'root' | 'random'; profile: string; bytes: number; streams: number | 'auto'; cc: 'cubic' | 'bbr'; cut: TransportBench['cut']; timeoutSec: number; modes: ('ferry' | 'plain')[]; say: (m: string) => void }): Promise<TransportBench> {
  const report: TransportBench = { corpus: o.corpus, profile: o.profile, cc: o.cc, bytes: o.bytes, streams: o.streams, cut: o.cut, startedAt: new Date().toISOString(), runs: [] };
  const c = await corpus(o.bytes, o.corpus);
  await labDown('tbench', { force: true });
  const lab = await labUp({ name: 'tbench', base: '10.200', profile: o.profile, cc: o.cc, scheduleOutage: false });
  try {
    // The two lab hosts pin each other's certificates, as operators do with `ferry host trust`.
    const [h1, h2] = lab.hosts as [LabState['hosts'][0], LabState['hosts'][0]];
    trustHost(h1.dataDir, { name: 'h2', url: h2.apiUrl, fingerprint: certFingerprint(fs.readFileSync(files(h2.dataDir).cert, 'utf8')) });
    trustHost(h2.dataDir, { name: 'h1', url: h1.apiUrl, fingerprint: certFingerprint(fs.readFileSync(files(h1.dataDir).cert, 'utf8')) });
    for (const mode of o.modes) {
      o.say(`  ${mode}: ${(o.bytes / 2 ** 20).toFixed(0)} MiB over ${getProfile(o.profile).description}${o.cut ? `, ${o.cut.seconds} s ${o.cut.flap ? 'flap' : 'outage'} at t+${o.cut.atSeconds} s` : ''}`);
      const r = await once(lab, mode, { bytes: o.bytes, streams: o.streams, cut: o.cut, timeoutSec: o.timeoutSec, corpus: c });
      o.say(r.ok ? `    ${r.seconds!.toFixed(1)} s, goodput ${r.goodputMbps!.toFixed(2)} Mbit/s (${(r.linkShare! * 100).toFixed(0)} % of the link rate; link kept ${(r.linkUtilization! * 100).toFixed(0)} % busy), wire ${(r.wireBytes! / 2 ** 20).toFixed(1)} MiB${r.framesSent ? `, resent ${r.resentFrames}/${r.framesSent} frames` : ''}` : `    FAILED: ${r.error}`);
      report.runs.push(r);
    }
  } finally {
    await labDown('tbench', { force: true });
  }
  return report;
}
