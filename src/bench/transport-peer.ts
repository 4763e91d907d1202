// Why this file exists: the two ends of `ferry bench transport`, run inside lab hosts
// (ip netns exec). One JSON line on stdout when done.
//   recv  PORT MODE DATADIR      MODE ferry|plain; prints {bytes, sha256, seconds, cpuSec}
//   send  HOST:PORT MODE DATADIR FILE BYTES STREAMS   prints {bytes, seconds, cpuSec, stats}
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { dial, listen } from '../transport/endpoint.js';
import { CHANNELS } from '../transport/protocol.js';
import { loadIdentity } from '../transport/tls.js';

const [role, addr, mode, dataDir, file, bytesArg, streamsArg] = process.argv.slice(2);
const out = (v: unknown) => process.stdout.write(JSON.stringify(v) + '\n');
const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};
const BLOCK = 64 * 1024;

if (role === 'recv') {
  const port = Number(addr);
  const h = crypto.createHash('sha256');
  let bytes = 0;
  let t0 = 0;
  let finished = false;
  const done = () => {
    if (finished) return;
    finished = true;
    out({ bytes, sha256: h.digest('hex'), seconds: (performance.now() - t0) / 1000, cpuSec: cpu() });
    // Stay a moment so the final acknowledgements reach the sender.
    setTimeout(() => process.exit(0), 3000);
  };
  if (mode === 'plain') {
    net.createServer((s) => {
      s.on('data', (d: Buffer) => {
        if (!t0) t0 = performance.now();
        bytes += d.length;
        h.update(d);
      });
      s.on('end', done);
    }).listen(port);
  } else {
    void listen({
      host: '0.0.0.0',
      port,
      security: { identity: loadIdentity(dataDir!) },
      onSession: (s) => {
        // Channels are ordered independently: "done" (with the byte count) may overtake data.
        let expected = -1;
        s.on('message', (ch: number, m: Buffer) => {
          if (!t0) t0 = performance.now();
          if (ch === CHANNELS.control) expected = (JSON.parse(m.toString()) as { bytes: number }).bytes;
          else {
            bytes += m.length;
            h.update(m);
          }
          if (expected >= 0 && bytes >= expected) done();
        });
      },
      onRefused: (why) => process.stderr.write(`refused: ${why}\n`),
    });
  }
} else if (role === 'send') {
  const [host, port] = [addr!.split(':')[0]!, Number(addr!.split(':')[1])];
  const total = Number(bytesArg);
  const fd = fs.openSync(file!, 'r');
  const buf = Buffer.alloc(BLOCK);
  const t0 = performance.now();
  if (mode === 'plain') {
    const s = net.connect(port, host, async () => {
      for (let off = 0; off < total; off += BLOCK) {
        const n = fs.readSync(fd, buf, 0, Math.min(BLOCK, total - off), off);
        if (!s.write(Buffer.from(buf.subarray(0, n)))) await new Promise((r) => s.once('drain', r));
      }
      s.end();
    });
    s.on('close', () => out({ bytes: total, seconds: (performance.now() - t0) / 1000, cpuSec: cpu() }));
  } else {
    const cap = Number(process.env.FERRY_BENCH_RATE ?? 0);
    const session = await dial({ host, port, security: { identity: loadIdentity(dataDir!) }, streams: streamsArg === 'auto' || !streamsArg ? 'auto' : Number(streamsArg), ...(cap ? { session: { rateBytesPerSec: cap } } : {}) });
    const events: string[] = [];
    session.on('stall', () => events.push(`stall@${((performance.now() - t0) / 1000).toFixed(1)}s`));
    session.on('resume', () => events.push(`resume@${((performance.now() - t0) / 1000).toFixed(1)}s`));
    session.on('connection-lost', (e: { connections: number; inflight: number }) => events.push(`lost@${((performance.now() - t0) / 1000).toFixed(1)}s(${e.inflight} in flight, ${e.connections} left, window ${(session.window() / 2 ** 20).toFixed(1)} MiB)`));
    for (let off = 0; off < total; off += BLOCK) {
      const n = fs.readSync(fd, buf, 0, Math.min(BLOCK, total - off), off);
      await session.send(CHANNELS.disk, Buffer.from(buf.subarray(0, n)));
    }
    await session.send(CHANNELS.control, Buffer.from(JSON.stringify({ bytes: total })));
    await session.flush();
    out({ bytes: total, seconds: (performance.now() - t0) / 1000, cpuSec: cpu(), stats: session.stats, events });
    session.close('done');
    setTimeout(() => process.exit(0), 200);
  }
}
