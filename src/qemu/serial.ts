// Why this file exists: the guest's serial console is both an operator's console and Ferry's
// measuring instrument. This reader stays attached to QEMU's serial socket (draining it, so the
// guest never blocks on a full console), stamps each line with the *host* clock (the guest's
// clock stops while it is paused), and keeps the figures tests and benchmarks need: heartbeat
// gaps and the last sequence number the guest's disk writer reported durable.
import { EventEmitter } from 'node:events';
import net from 'node:net';

export interface GuestStats {
  /** FERRY-READY seen since attach. */
  ready: boolean;
  heartbeats: number;
  lastHeartbeat: number;
  lastHeartbeatAt: number | null;
  /** host time of the first heartbeat seen since attach (a migration destination's first sign of life) */
  firstHeartbeatAt: number | null;
  /** Largest gap between consecutive heartbeat lines (host ms) since the last reset. */
  maxGapMs: number;
  maxGapAt: number | null;
  lastDurableSeq: number;
  rootLine: string | null;
}

export function emptyStats(): GuestStats {
  return { ready: false, heartbeats: 0, lastHeartbeat: 0, lastHeartbeatAt: null, firstHeartbeatAt: null, maxGapMs: 0, maxGapAt: null, lastDurableSeq: 0, rootLine: null };
}

/** Folds one console line (received at host time `at`) into the stats. Pure; unit tested. */
export function foldLine(s: GuestStats, line: string, at: number): void {
  let m: RegExpExecArray | null;
  if ((m = /FERRY-HB (\d+)/.exec(line))) {
    if (s.lastHeartbeatAt !== null) {
      const gap = at - s.lastHeartbeatAt;
      if (gap > s.maxGapMs) {
        s.maxGapMs = gap;
        s.maxGapAt = at;
      }
    }
    s.heartbeats++;
    s.firstHeartbeatAt ??= at;
    s.lastHeartbeat = Number(m[1]);
    s.lastHeartbeatAt = at;
  } else if ((m = /FERRY-DURABLE (\d+)/.exec(line))) {
    s.lastDurableSeq = Math.max(s.lastDurableSeq, Number(m[1]));
  } else if (line.includes('FERRY-READY')) {
    s.ready = true;
  } else if (line.includes('FERRY-ROOT')) {
    s.rootLine = line.trim();
  }
}

export class SerialReader extends EventEmitter {
  readonly stats: GuestStats = emptyStats();
  private sock: net.Socket | undefined;
  private partial = '';
  private stopped = false;

  constructor(private readonly socketPath: string) {
    super();
  }

  /** Connects (retrying for up to `timeoutMs` while QEMU creates the socket). */
  async attach(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        this.sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(this.socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        break;
      } catch (e) {
        if (Date.now() >= deadline) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    this.sock.on('data', (d: Buffer) => this.onData(d));
    this.sock.on('error', () => {});
    this.sock.on('close', () => {
      if (!this.stopped) this.emit('close');
    });
  }

  /** Sends text to the guest's console (as typed; add '\n' to submit a line). */
  write(text: string): void {
    this.sock?.write(text);
  }

  resetGap(): void {
    this.stats.maxGapMs = 0;
    this.stats.maxGapAt = null;
  }

  close(): void {
    this.stopped = true;
    this.sock?.destroy();
  }

  private onData(d: Buffer): void {
    const at = Date.now();
    this.partial += d.toString('utf8');
    let nl: number;
    while ((nl = this.partial.indexOf('\n')) >= 0) {
      const line = this.partial.slice(0, nl).replace(/\r$/, '');
      this.partial = this.partial.slice(nl + 1);
      foldLine(this.stats, line, at);
      this.emit('line', line, at);
    }
    if (this.partial.length > 65536) this.partial = this.partial.slice(-4096);
  }
}
