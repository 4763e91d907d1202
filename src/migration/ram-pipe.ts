// Why this file exists: QEMU's RAM migration stream, carried by Ferry's transport instead of a
// TCP connection QEMU would open itself. The source agent listens on a unix socket QEMU migrates
// to (`migrate unix:…`) and forwards every byte on the RAM channel, reading from QEMU only as
// fast as the transport accepts (so QEMU sees the real drain rate). The destination agent
// connects to its QEMU's `migrate-incoming unix:…` socket and writes the channel's bytes into it.
//
// The source reads QEMU's stream as it comes and spools what the transport has not taken yet
// (bounded: QEMU's max-bandwidth is paced by this backlog plus the transport's queue). QEMU's
// migration thread must not sit blocked in write() on a full socket: under TCG, QEMU 7.2's RAM
// pre-copy diverged (guest pages stale at the destination, the stream itself intact) after its
// thread was held that way through a link outage — see docs/benchmarks.md.
// The stream gets the transport's compression, multi-stream striping and resumption for free.
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import type { Session } from '../transport/session.js';
import { CH } from './protocol.js';

export interface RamSource {
  /** bytes read from QEMU and handed to the transport */
  bytes(): number;
  /** bytes read from QEMU that the transport has not taken yet */
  backlog(): number;
  /** SHA-256 (hex) of every byte handed to the transport; final once `ended` resolved */
  digest(): string;
  /** resolves when QEMU closed the stream and every byte was queued */
  ended: Promise<void>;
  close(): void;
}

const SPOOL_MAX = 256 * 2 ** 20;

export async function listenForQemu(sockPath: string, session: Session): Promise<RamSource> {
  fs.rmSync(sockPath, { force: true });
  let bytes = 0;
  const hash = crypto.createHash('sha256');
  let digest = '';
  let endResolve!: () => void;
  const ended = new Promise<void>((r) => (endResolve = r));
  const spool: Buffer[] = [];
  let backlog = 0;
  let closed = false;
  let pumping = false;
  let conn: net.Socket | undefined;
  const finish = () => {
    digest = hash.digest('hex');
    endResolve();
  };
  // Hands the spool to the transport in order; one pump at a time.
  const pump = async () => {
    if (pumping) return;
    pumping = true;
    try {
      while (spool.length) {
        const d = spool[0]!;
        await session.send(CH.RAM, d);
        spool.shift();
        backlog -= d.length;
        bytes += d.length;
        if (conn?.isPaused() && backlog < SPOOL_MAX / 2) conn.resume();
      }
    } catch {
      conn?.destroy();
      spool.length = 0;
      backlog = 0;
      return;
    } finally {
      pumping = false;
    }
    if (closed) finish();
  };
  const server = net.createServer((c) => {
    if (conn) return c.destroy(); // one stream per migration
    conn = c;
    c.on('data', (d: Buffer) => {
      hash.update(d);
      spool.push(d);
      backlog += d.length;
      if (backlog > SPOOL_MAX) c.pause(); // a last resort; pacing keeps the backlog far below
      void pump();
    });
    c.on('close', () => {
      closed = true;
      if (!pumping && spool.length === 0) finish();
      else void pump();
    });
    c.on('error', () => {});
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(sockPath, resolve);
  });
  return {
    bytes: () => bytes,
    backlog: () => backlog,
    digest: () => digest,
    ended,
    close: () => {
      conn?.destroy();
      server.close();
      fs.rmSync(sockPath, { force: true });
    },
  };
}

export interface RamSink {
  write(b: Buffer): void;
  bytes(): number;
  /** SHA-256 (hex) of every byte written so far */
  digest(): string;
  close(): void;
}

/** Connects to the destination QEMU's incoming socket; bytes pushed before it connects wait. */
export function connectToQemu(sockPath: string): Promise<RamSink> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    const hash = crypto.createHash('sha256');
    const c = net.connect(sockPath);
    c.once('connect', () =>
      resolve({
        write: (b) => {
          bytes += b.length;
          hash.update(b);
          c.write(b);
        },
        bytes: () => bytes,
        digest: () => hash.copy().digest('hex'),
        close: () => c.destroy(),
      }),
    );
    c.once('error', (e) => reject(e));
  });
}
