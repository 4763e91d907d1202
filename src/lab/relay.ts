// Why this file exists: the WAN lab's packet-level link emulator. This kernel has no netem, so
// the lab hosts' WAN interfaces are VXLAN devices whose UDP underlay all points at this relay
// (it runs in the lab's "wan" namespace). For each datagram it reads the inner Ethernet frame's
// destination MAC to find the destination host, asks that direction's LinkDirection model for
// a fate (drop, or deliver at time T), and sends it on at T. TCP inside sees real serialization,
// delay, jitter, loss and reordering.
//
// Also here, because they act on all directions at once: outages ("cut"), immediate or
// scheduled, and flow forgetting after an outage (flap: packets of TCP flows seen before the
// outage are dropped for good, as after a NAT or stateful-firewall reset).
//
// Control: JSON lines on a unix socket — {"op":"status"} | {"op":"set","dir":"1>2"|"*",
// "params":{…}} | {"op":"cut","seconds":S,"at":EPOCH_MS?,"flap":bool} | {"op":"reset"}.
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { LinkDirection, seedFor, type DirectionCounters, type LinkParams } from './link.js';

export const VXLAN_PORT = 4789;
const VXLAN_HDR = 8;
/** A packet may leave up to this much before its time (timer resolution; see `arm`)… */
const EARLY_MS = 1;
/** …but never more than this share of its direction's one-way delay (lan: 0.25 ms). */
const EARLY_SHARE = 0.02;

function early(p: Pending): number {
  return Math.min(EARLY_MS, p.dir.params.delayMs * EARLY_SHARE);
}

export interface RelayHost {
  index: number;
  mac: string;
  underlayIp: string;
}

export interface RelayConfig {
  hosts: RelayHost[];
  link: LinkParams;
  seed: number;
  control: string;
}

export interface RelayStatus {
  startedAt: number;
  seed: number;
  cut: { until: number; flap: boolean } | null;
  scheduledCuts: { at: number; seconds: number; flap: boolean }[];
  forgottenFlows: number;
  directions: Record<string, { params: LinkParams; counters: DirectionCounters; backlogBytes: number }>;
  /**
   * Packets the relay sent later than the link model said (its event loop waited for a core):
   * how many, the worst, and the latest of them (epoch ms, ms late). A faithful link has none;
   * the benchmark reports those in the switchover's pause.
   */
  late: { packets: number; maxMs: number; recent: { at: number; ms: number }[] };
}

/**
 * The relay's scheduling priority (nice) while every direction's one-way delay is ≥ 1 ms: the
 * emulated link must not wait for a core the lab's hosts (QEMU under TCG, the agents) keep busy
 * — a real WAN does not. Measured on wan-10 at nice 0: packets went out up to 12.6 ms late in a
 * migration's pause. Sub-millisecond links (lan) keep nice 0: there the relay spins between
 * packets (`arm`), and at a higher priority that would take a core from the hosts.
 * FERRY_RELAY_NICE=N sets it instead (0: as the hosts).
 */
const WAN_NICE = process.env.FERRY_RELAY_NICE !== undefined ? Number(process.env.FERRY_RELAY_NICE) : -10;

/** a packet sent this much after its time counts as late */
const LATE_MS = 2;
/** late packets remembered (for the benchmark's pause window) */
const LATE_KEPT = 512;

interface Pending {
  at: number;
  seq: number;
  buf: Buffer;
  to: RelayHost;
  dir: LinkDirection;
}

/** Binary min-heap on (at, seq): the relay's delivery schedule. */
class Schedule {
  private h: Pending[] = [];
  get size(): number {
    return this.h.length;
  }
  peek(): Pending | undefined {
    return this.h[0];
  }
  push(p: Pending): void {
    const h = this.h;
    h.push(p);
    let i = h.length - 1;
    while (i > 0) {
      const j = (i - 1) >> 1;
      if (less(h[j]!, h[i]!)) break;
      [h[i], h[j]] = [h[j]!, h[i]!];
      i = j;
    }
  }
  pop(): Pending | undefined {
    const h = this.h;
    const top = h[0];
    const last = h.pop();
    if (h.length && last) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && less(h[l]!, h[m]!)) m = l;
        if (r < h.length && less(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }
}
const less = (a: Pending, b: Pending) => a.at < b.at || (a.at === b.at && a.seq < b.seq);

/** Bidirectional key of an inner IPv4 TCP packet, or null for anything else. */
export function tcpFlowKey(frame: Buffer): string | null {
  if (frame.length < 14 + 20 || frame.readUInt16BE(12) !== 0x0800) return null;
  const ihl = (frame[14]! & 0x0f) * 4;
  if (frame[14 + 9] !== 6 || frame.length < 14 + ihl + 4) return null;
  const a = `${frame.readUInt32BE(14 + 12)}:${frame.readUInt16BE(14 + ihl)}`;
  const b = `${frame.readUInt32BE(14 + 16)}:${frame.readUInt16BE(14 + ihl + 2)}`;
  return a < b ? `${a}-${b}` : `${b}-${a}`;
}

export function macBytes(mac: string): Buffer {
  return Buffer.from(mac.split(':').map((x) => parseInt(x, 16)));
}

export class Relay {
  private readonly sock = dgram.createSocket({ type: 'udp4', recvBufferSize: 8 << 20, sendBufferSize: 8 << 20 });
  private readonly dirs = new Map<string, LinkDirection>();
  private readonly byIp = new Map<string, RelayHost>();
  private readonly byMac = new Map<string, RelayHost>();
  private readonly schedule = new Schedule();
  private seq = 0;
  private timer: NodeJS.Timeout | undefined;
  private immediate = false;
  /** when the armed timer fires (ms, `now()` clock) */
  private timerAt = Infinity;
  private cut: { until: number; flap: boolean } | null = null;
  private scheduledCuts: { at: number; seconds: number; flap: boolean }[] = [];
  private seenFlows = new Set<string>();
  private deadFlows = new Set<string>();
  private control: net.Server | undefined;
  private readonly startedAt = Date.now();
  private readonly t0 = performance.now();
  private late: RelayStatus['late'] = { packets: 0, maxMs: 0, recent: [] };

  constructor(private readonly cfg: RelayConfig) {
    for (const h of cfg.hosts) {
      this.byIp.set(h.underlayIp, h);
      this.byMac.set(macBytes(h.mac).toString('hex'), h);
    }
    for (const a of cfg.hosts) for (const b of cfg.hosts) if (a !== b) this.dirs.set(`${a.index}>${b.index}`, new LinkDirection({ ...cfg.link }, seedFor(cfg.seed, `${a.index}>${b.index}`)));
    this.prioritize();
  }

  /** WAN_NICE while no direction is sub-millisecond, else nice 0 (this thread: the event loop). */
  private prioritize(): void {
    const wan = [...this.dirs.values()].every((d) => d.params.delayMs >= 1);
    try {
      os.setPriority(wan ? WAN_NICE : 0);
    } catch {
      /* not root: the lab needs root anyway; the link is then only less faithful */
    }
  }

  /** ms on a monotonic clock; Date.now() only for what operators read. */
  private now(): number {
    return performance.now() - this.t0;
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.sock.bind(VXLAN_PORT, resolve));
    this.sock.on('message', (buf, rinfo) => this.onPacket(buf, rinfo.address));
    fs.rmSync(this.cfg.control, { force: true });
    this.control = net.createServer((c) => this.onControl(c));
    await new Promise<void>((resolve) => this.control!.listen(this.cfg.control, resolve));
  }

  private onPacket(buf: Buffer, fromIp: string): void {
    const from = this.byIp.get(fromIp);
    if (!from || buf.length < VXLAN_HDR + 14) return;
    const frame = buf.subarray(VXLAN_HDR);
    const dst = frame.subarray(0, 6);
    const targets = dst[0]! & 1 ? this.cfg.hosts.filter((h) => h !== from) : [this.byMac.get(dst.toString('hex'))].filter((h): h is RelayHost => !!h && h !== from);
    const now = this.now();
    this.expireCut(now);
    const flow = tcpFlowKey(frame);
    let forced: 'outage' | 'flow' | undefined;
    if (this.cut) forced = 'outage';
    else if (flow && this.deadFlows.has(flow)) forced = 'flow';
    else if (flow) this.seenFlows.add(flow);
    for (const to of targets) {
      const dir = this.dirs.get(`${from.index}>${to.index}`)!;
      const at = dir.admit(now, frame.length, forced);
      if (typeof at === 'number') this.schedule.push({ at, seq: this.seq++, buf, to, dir });
    }
    this.arm();
  }

  private expireCut(now: number): void {
    if (!this.cut && !this.scheduledCuts.length) return; // the per-packet common case
    const wall = Date.now();
    for (const c of this.scheduledCuts.filter((c) => c.at <= wall)) {
      this.scheduledCuts.splice(this.scheduledCuts.indexOf(c), 1);
      this.startCut(c.seconds, c.flap, now);
    }
    if (this.cut && now >= this.cut.until) this.cut = null;
  }

  private startCut(seconds: number, flap: boolean, now = this.now()): void {
    this.cut = { until: now + seconds * 1000, flap };
    if (flap) {
      for (const f of this.seenFlows) this.deadFlows.add(f);
      this.seenFlows.clear();
    }
    // Packets already on the wire when the link goes down are lost too.
    let p: Pending | undefined;
    while ((p = this.schedule.pop())) p.dir.retract(p.buf.length - VXLAN_HDR);
  }

  /**
   * Sends what is due; sleeps until the next due packet. Timers have millisecond resolution, so a
   * packet goes out up to 1 ms (2 % of its one-way delay at most) before its time rather than the
   * relay spinning for it: spinning (setImmediate below 1 ms) cost a third of a core on a busy
   * 10 Mbit/s link (a packet every 1.2 ms), taken from the lab hosts' QEMU and agents on the same
   * cores. Only sub-millisecond delays (lan) still spin. Each packet's time comes from the link
   * model, not from when the one before went out, so early sends do not add up.
   */
  private arm(): void {
    const next = this.schedule.peek();
    if (this.timer) {
      if (!next || next.at >= this.timerAt) return;
      clearTimeout(this.timer); // a packet due before the armed timer (the other direction)
      this.timer = undefined;
    }
    if (this.immediate) return;
    if (!next) {
      if (this.cut || this.scheduledCuts.length) this.timer = setTimeout(() => ((this.timer = undefined), this.expireCut(this.now()), this.arm()), 100);
      return;
    }
    const wait = next.at - this.now();
    if (wait <= early(next)) return this.flush();
    if (wait < 1) {
      this.immediate = true;
      setImmediate(() => {
        this.immediate = false;
        this.flush();
      });
      return;
    }
    this.timerAt = next.at;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.timerAt = Infinity;
      this.flush();
    }, Math.floor(wait));
  }

  private flush(): void {
    const now = this.now();
    let p: Pending | undefined;
    while ((p = this.schedule.peek()) && p.at <= now + early(p)) {
      this.schedule.pop();
      this.sock.send(p.buf, VXLAN_PORT, p.to.underlayIp);
      if (now - p.at > LATE_MS) this.noteLate(now - p.at);
    }
    this.arm();
  }

  private noteLate(ms: number): void {
    const l = this.late;
    l.packets++;
    l.maxMs = Math.max(l.maxMs, ms);
    if (l.recent.length >= LATE_KEPT) l.recent.shift();
    l.recent.push({ at: Math.round(Date.now() - ms), ms: Math.round(ms * 10) / 10 });
  }

  status(): RelayStatus {
    const now = this.now();
    this.expireCut(now);
    const directions: RelayStatus['directions'] = {};
    for (const [k, d] of this.dirs) directions[k] = { params: d.params, counters: d.counters, backlogBytes: Math.round(d.backlogBytes(now)) };
    return {
      startedAt: this.startedAt,
      seed: this.cfg.seed,
      cut: this.cut ? { until: Date.now() + (this.cut.until - now), flap: this.cut.flap } : null,
      scheduledCuts: this.scheduledCuts,
      forgottenFlows: this.deadFlows.size,
      directions,
      late: this.late,
    };
  }

  private onControl(c: net.Socket): void {
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let reply: unknown;
        try {
          reply = { ok: true, result: this.command(JSON.parse(line) as Record<string, unknown>) };
        } catch (e) {
          reply = { ok: false, error: (e as Error).message };
        }
        c.write(JSON.stringify(reply) + '\n');
      }
    });
    c.on('error', () => {});
  }

  command(cmd: Record<string, unknown>): unknown {
    switch (cmd.op) {
      case 'status':
        return this.status();
      case 'set': {
        const sel = (cmd.dir as string | undefined) ?? '*';
        const keys = sel === '*' ? [...this.dirs.keys()] : [sel];
        for (const k of keys) {
          const d = this.dirs.get(k);
          if (!d) throw new Error(`no direction ${k} (have ${[...this.dirs.keys()].join(', ')})`);
          d.params = { ...d.params, ...(cmd.params as Partial<LinkParams>) };
        }
        this.prioritize();
        return this.status();
      }
      case 'cut': {
        const seconds = Number(cmd.seconds);
        if (!(seconds > 0)) throw new Error('cut needs seconds > 0');
        const flap = cmd.flap === true;
        if (typeof cmd.at === 'number' && cmd.at > Date.now()) this.scheduledCuts.push({ at: cmd.at, seconds, flap });
        else this.startCut(seconds, flap);
        this.arm();
        return this.status();
      }
      case 'reset':
        for (const d of this.dirs.values()) Object.assign(d.counters, { packets: 0, bytes: 0, deliveredPackets: 0, deliveredBytes: 0, dropped: { queue: 0, loss: 0, outage: 0, flow: 0 } });
        this.late = { packets: 0, maxMs: 0, recent: [] };
        return this.status();
      default:
        throw new Error(`unknown op ${String(cmd.op)}`);
    }
  }
}

