// Why this file exists: measuring a lab link from the ends, the way the link's users see it, to
// check the emulator does what it was told (rate, RTT, loss) and to record TCP goodput. A
// server runs in one host's namespace, a client in another's (`node dist/lab/probe.js …` under
// `ip netns exec`). Plain UDP/TCP on port 5201; no external tool (fresh Debian has no ping).
//
//   UDP datagrams: 'E' echo (RTT) | 'S' sink: session u32, seq u32 (loss, rate) | 'Q' query: session
//   TCP: the client streams for N seconds and half-closes; the server answers bytes + duration.
import dgram from 'node:dgram';
import net from 'node:net';
import { sleep } from '../util/wait.js';

const PORT = 5201;

interface Session {
  received: number;
  bytes: number;
  first: number;
  last: number;
}

export function server(): void {
  const sessions = new Map<number, Session>();
  const u = dgram.createSocket({ type: 'udp4', recvBufferSize: 8 << 20 });
  u.on('message', (m, r) => {
    const t = m[0];
    if (t === 0x45 /* E */) u.send(m, r.port, r.address);
    else if (t === 0x53 /* S */ && m.length >= 9) {
      const id = m.readUInt32BE(1);
      const now = performance.now();
      const s = sessions.get(id) ?? { received: 0, bytes: 0, first: now, last: now };
      s.received++;
      s.bytes += m.length;
      s.last = now;
      sessions.set(id, s);
    } else if (t === 0x51 /* Q */ && m.length >= 5) {
      const s = sessions.get(m.readUInt32BE(1)) ?? { received: 0, bytes: 0, first: 0, last: 0 };
      u.send(Buffer.from(JSON.stringify(s)), r.port, r.address);
    }
  });
  u.bind(PORT);
  net
    .createServer((c) => {
      let bytes = 0;
      let first = 0;
      let last = 0;
      c.on('data', (d) => {
        const now = performance.now();
        if (!bytes) first = now;
        bytes += d.length;
        last = now;
      });
      c.on('end', () => c.end(JSON.stringify({ bytes, seconds: (last - first) / 1000 })));
      c.on('error', () => {});
    })
    .listen(PORT);
}


async function query(u: dgram.Socket, to: string, id: number): Promise<Session> {
  const q = Buffer.alloc(5);
  q[0] = 0x51;
  q.writeUInt32BE(id, 1);
  for (let i = 0; i < 40; i++) {
    const reply = new Promise<Session | undefined>((resolve) => {
      const t = setTimeout(() => resolve(undefined), 500);
      u.once('message', (m) => {
        clearTimeout(t);
        resolve(JSON.parse(m.toString()) as Session);
      });
    });
    u.send(q, PORT, to);
    const s = await reply;
    if (s) return s;
  }
  throw new Error('probe server did not answer the query');
}

/** Round-trip times of `count` small echoes, `intervalMs` apart. */
export async function rtt(to: string, count = 100, intervalMs = 20): Promise<{ sent: number; answered: number; medianMs: number; p10Ms: number; p90Ms: number }> {
  const u = dgram.createSocket('udp4');
  const sentAt = new Map<number, number>();
  const rtts: number[] = [];
  u.on('message', (m) => {
    const seq = m.readUInt32BE(1);
    const t = sentAt.get(seq);
    if (t !== undefined) rtts.push(performance.now() - t);
  });
  await new Promise<void>((r) => u.bind(0, r));
  for (let i = 0; i < count; i++) {
    const b = Buffer.alloc(64);
    b[0] = 0x45;
    b.writeUInt32BE(i, 1);
    sentAt.set(i, performance.now());
    u.send(b, PORT, to);
    await sleep(intervalMs);
  }
  await sleep(1500);
  u.close();
  rtts.sort((a, b) => a - b);
  const q = (f: number) => rtts[Math.min(rtts.length - 1, Math.floor(f * rtts.length))] ?? NaN;
  return { sent: count, answered: rtts.length, medianMs: q(0.5), p10Ms: q(0.1), p90Ms: q(0.9) };
}

/**
 * Sends `count` datagrams of `size` bytes at `bps` (0 = `pps` packets/s) and asks the server
 * what arrived: one-way loss, and the arrival rate over the receiving window.
 */
export async function blast(to: string, o: { count?: number; seconds?: number; size?: number; bps?: number; pps?: number }): Promise<{ sent: number; received: number; loss: number; rateBps: number }> {
  const u = dgram.createSocket({ type: 'udp4', sendBufferSize: 8 << 20 });
  u.setMaxListeners(100);
  await new Promise<void>((r) => u.bind(0, r));
  const id = (Math.random() * 2 ** 32) >>> 0;
  const size = o.size ?? 1200;
  const interval = o.bps ? (size * 8 * 1000) / o.bps : 1000 / (o.pps ?? 500);
  const count = o.count ?? Math.round(((o.seconds ?? 5) * 1000) / interval);
  const buf = Buffer.alloc(size);
  buf[0] = 0x53;
  buf.writeUInt32BE(id, 1);
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    buf.writeUInt32BE(i, 5);
    u.send(buf, PORT, to);
    const due = t0 + (i + 1) * interval;
    const wait = due - performance.now();
    if (wait > 2) await sleep(wait);
    else if (i % 64 === 0) await new Promise((r) => setImmediate(r));
  }
  await sleep(1500);
  const s = await query(u, to, id);
  u.close();
  const window = (s.last - s.first) / 1000;
  // Rate as the link counts it: Ethernet frames (payload + UDP 8 + IPv4 20 + Ethernet 14).
  const frameBytes = s.bytes + 42 * s.received - (size + 42);
  return { sent: count, received: s.received, loss: 1 - s.received / count, rateBps: window > 0 ? (frameBytes * 8) / window : 0 };
}

/** One TCP stream for `seconds`: goodput as the receiver counted it. */
export async function tcp(to: string, seconds = 5): Promise<{ bytes: number; seconds: number; goodputBps: number }> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection(PORT, to);
    const chunk = Buffer.alloc(64 * 1024, 7);
    let stop = false;
    let reply = '';
    c.on('connect', () => {
      setTimeout(() => {
        stop = true;
        c.end();
      }, seconds * 1000);
      const pump = () => {
        while (!stop && c.write(chunk));
      };
      c.on('drain', pump);
      pump();
    });
    c.on('data', (d) => (reply += d));
    c.on('end', () => {
      const r = JSON.parse(reply) as { bytes: number; seconds: number };
      resolve({ ...r, goodputBps: (r.bytes * 8) / r.seconds });
    });
    c.on('error', reject);
  });
}
