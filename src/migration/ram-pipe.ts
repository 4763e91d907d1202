// Why this file exists: QEMU's RAM migration stream, carried by Ferry's transport instead of a
// TCP connection QEMU would open itself. The source agent listens on a unix socket QEMU migrates
// to (`migrate unix:…`) and forwards every byte on the RAM channel. The destination agent
// connects to its QEMU's `migrate-incoming unix:…` socket and writes the channel's bytes into it.
//
// Pacing is backpressure: while the transport holds more than the gate's target (unacknowledged
// bytes plus the spool), the source stops reading QEMU's socket and QEMU's migration thread
// blocks in write(), as it would on a slow TCP connection. So QEMU's own bandwidth estimate is
// what the link drains after compression, whatever the pages compress to, and what is queued
// when QEMU pauses the guest (it crosses during the pause) stays bounded. While the link is down
// the gate opens instead: QEMU is held to a trickle by max-bandwidth (source.ts) and its stream
// goes to the spool, so its thread does not sit blocked through an outage.
// The stream gets the transport's compression, multi-stream striping and resumption for free,
// and, once the destination accepted it, Ferry's page-delta codec (ram-codec.ts) before those.
import fs from 'node:fs';
import { createXXHash128 } from 'hash-wasm';
import net from 'node:net';
import type { Session } from '../transport/session.js';
import { CH } from './protocol.js';
import type { RamEncoder } from './ram-codec.js';

export interface RamSource {
  /** bytes read from QEMU and handed to the transport */
  bytes(): number;
  /** bytes read from QEMU that the transport has not taken yet */
  backlog(): number;
  /** XXH128 (hex, STREAM_HASH) of every byte read from QEMU; set once `ended` resolved */
  digest(): string;
  /** resolves when QEMU closed the stream and every byte was queued */
  ended: Promise<void>;
  /** stops pacing (the guest is paused: QEMU's last bytes should be read, and sent, at once) */
  ungate(): void;
  /** ms of this thread spent since the pause hashing, encoding and in the transport's send (FERRY_DEBUG_MIGRATE) */
  cpuSincePause(): { hash: number; encode: number; send: number };
  /** encodes the stream with `enc` (ram-codec.ts); only before QEMU sends its first byte */
  encodeWith(enc: RamEncoder): void;
  close(): void;
}

const SPOOL_MAX = 256 * 2 ** 20;
/**
 * How both ends hash the stream for `ram-end`: XXH128, as guest RAM (ram-verify.ts: a check
 * against faults between two trusted agents, not an adversary). SHA-256 cost each side 12–17 ms
 * of its one thread in the pause, for QEMU's last 17 MB; XXH128 4–8.
 */
export const STREAM_HASH = 'xxh128';
/** Encoded bytes per RAM message at most (plus one chunk's worth) */
const BATCH = 256 * 1024;
/** Encoded bytes a RAM message waits for, and how long at most once nothing is left to encode */
const HOLD_MIN = 8 * 1024;
const HOLD_MS = 2;
/** FERRY_DEBUG_MIGRATE=FILE: QEMU's stream after the pause is saved to FILE.final-stream */
const DEBUG = process.env.FERRY_DEBUG_MIGRATE;

/** When the source stops reading QEMU's stream (see the header). */
export interface RamGate {
  /** queued bytes (transport unacknowledged + spool) above which reading stops */
  target(): number;
  /** the link is down and QEMU is held to a trickle: read (spool) regardless of the queue */
  open(): boolean;
}

export async function listenForQemu(sockPath: string, session: Session, gate?: RamGate): Promise<RamSource> {
  fs.rmSync(sockPath, { force: true });
  let bytes = 0;
  const hash = await createXXHash128();
  hash.init();
  let digest = '';
  let endResolve!: () => void;
  const ended = new Promise<void>((r) => (endResolve = r));
  const spool: Buffer[] = [];
  let backlog = 0;
  let closed = false;
  let pumping = false;
  let conn: net.Socket | undefined;
  let enc: RamEncoder | undefined;
  const finish = () => {
    clearInterval(poll);
    digest = hash.digest('hex');
    endResolve();
  };
  let gated = gate !== undefined;
  let paused = false;
  const finalStream: Buffer[] = []; // FERRY_DEBUG_MIGRATE: what QEMU sent after the pause
  const hold = () => backlog > SPOOL_MAX || (gated && !gate!.open() && session.unackedPayload + backlog > gate!.target());
  // Acknowledgements free the queue without an event here: look every few ms.
  const poll = setInterval(() => {
    if (conn?.isPaused() && backlog < SPOOL_MAX / 2 && !hold()) conn.resume();
  }, 4);
  poll.unref();
  // Hands the spool to the transport in order; one pump at a time. Once QEMU closed the stream
  // and the spool is empty, what the encoder still holds goes, then `ended` resolves.
  const cpu = { hash: 0, encode: 0, send: 0 };
  const clock = () => (paused ? performance.now() : 0);
  let flushed = false;
  let done = false;
  // What the encoder made waits for HOLD_MIN bytes (or HOLD_MS with nothing more to encode)
  // before it goes as a message. A message costs the transport ~250 µs of this thread (zstd,
  // framing, parity, a TLS write), and in the pause this thread's pace is QEMU's (profiled on
  // wan-10: 111 messages of ~2.5 KB for QEMU's last 17.6 MB took 25–31 ms of it, 4–8 ms once
  // held). Before it, a pass of re-sent pages went as hundreds of ~250-byte frames, and the
  // ones in flight when QEMU paused the guest were each a frame to track, acknowledge and,
  // when an acknowledgement was late, copy.
  let out: Buffer[] = [];
  let outBytes = 0;
  let outTaken: Buffer[] = []; // the stream chunks `out` stands for
  let holdTimer: NodeJS.Timeout | undefined;
  let holdExpired = false;
  const pump = async () => {
    if (pumping) return;
    pumping = true;
    try {
      for (;;) {
        // Stream cuts never repeat: no dedup. Once ungated (the guest is paused), the cores are
        // what the last pages wait for: zstd 3 compresses them 3-4x faster than 9, to ~5 % more.
        // Encoded, what the spool holds goes as one message: a 64 KiB chunk of re-sent pages
        // encodes to ~1 KB, and per message the transport pays a frame, a write and zstd's setup.
        // The encoder holds back a page record cut by the end of a chunk (it comes with the next).
        let t = clock();
        if (enc) {
          let size = 0;
          while (spool.length && size < BATCH) {
            const d = spool.shift()!;
            outTaken.push(d);
            const e = enc.push(d);
            if (e.length) out.push(e);
            outBytes += e.length;
            size += e.length;
          }
          if (!spool.length && closed && !flushed) {
            flushed = true;
            const e = enc.end();
            if (e.length) out.push(e);
            outBytes += e.length;
          }
        } else if (spool.length) {
          const d = spool.shift()!;
          outTaken.push(d);
          out.push(d);
          outBytes += d.length;
        }
        if (paused) cpu.encode += performance.now() - t;
        const hold = enc !== undefined && !closed && !holdExpired && outBytes < HOLD_MIN;
        if (!hold && outTaken.length) {
          clearTimeout(holdTimer);
          holdTimer = undefined;
          holdExpired = false;
          const m = out.length === 1 ? out[0]! : Buffer.concat(out);
          const taken = outTaken;
          out = [];
          outBytes = 0;
          outTaken = [];
          t = clock();
          if (m.length) {
            const sent = session.send(CH.RAM, m, paused ? { dedup: false, maxLevel: 3 } : { dedup: false });
            if (paused) cpu.send += performance.now() - t; // the synchronous part: compression, framing
            await sent;
          }
          for (const d of taken) {
            backlog -= d.length;
            bytes += d.length;
          }
        }
        if (!spool.length && !(closed && enc && !flushed) && !(closed && outTaken.length)) {
          if (hold && outTaken.length && !holdTimer) {
            holdTimer = setTimeout(() => {
              holdTimer = undefined;
              holdExpired = true;
              void pump();
            }, HOLD_MS);
          }
          break;
        }
        // Let the socket be read before the next batch: more chunks per message.
        if (enc) await new Promise<void>((r) => setImmediate(r));
      }
    } catch {
      conn?.destroy();
      spool.length = 0;
      backlog = 0;
      return;
    } finally {
      pumping = false;
    }
    if (closed && !done && !outTaken.length) {
      done = true;
      finish();
    }
  };
  const server = net.createServer((c) => {
    if (conn) return c.destroy(); // one stream per migration
    conn = c;
    c.on('data', (d: Buffer) => {
      if (paused && DEBUG) finalStream.push(d);
      const t = clock();
      hash.update(d);
      if (paused) cpu.hash += performance.now() - t;
      spool.push(d);
      backlog += d.length;
      if (hold()) c.pause();
      void pump();
    });
    c.on('close', () => {
      // Written later and asynchronously: a synchronous 17 MB write here held the event loop, and
      // with it the pause, for 30–110 ms in every debug run of session 6.
      if (DEBUG) setTimeout(() => fs.writeFile(`${DEBUG}.final-stream`, Buffer.concat(finalStream), () => {}), 5000).unref();
      closed = true;
      void pump();
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
    cpuSincePause: () => ({ ...cpu }),
    encodeWith: (e) => {
      if (bytes + backlog > 0) throw new Error('encodeWith after the stream began');
      enc = e;
    },
    ungate: () => {
      gated = false;
      paused = true;
      if (conn?.isPaused() && backlog < SPOOL_MAX / 2) conn.resume();
    },
    close: () => {
      clearInterval(poll);
      clearTimeout(holdTimer);
      enc = undefined;
      conn?.destroy();
      server.close();
      fs.rmSync(sockPath, { force: true });
    },
  };
}

export interface RamSink {
  /** `written`: QEMU's socket took `b`, which may then be reused */
  write(b: Buffer, written?: () => void): void;
  bytes(): number;
  /** when the last bytes were written (Date.now()), for the switchover timeline */
  lastWriteAt(): number;
  /** XXH128 (hex, STREAM_HASH) of every byte written; call once, after the last write */
  digest(): string;
  /** bytes written that are still buffered in this process (QEMU has not taken them) */
  pending(): number;
  close(): void;
}

/** Connects to the destination QEMU's incoming socket; bytes pushed before it connects wait. */
export async function connectToQemu(sockPath: string): Promise<RamSink> {
  const hash = await createXXHash128();
  hash.init();
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let lastAt = 0;
    const c = net.connect(sockPath);
    c.once('connect', () =>
      resolve({
        write: (b, written) => {
          bytes += b.length;
          lastAt = Date.now();
          hash.update(b);
          c.write(b, written);
        },
        bytes: () => bytes,
        lastWriteAt: () => lastAt,
        digest: () => hash.digest('hex'),
        pending: () => c.writableLength,
        close: () => c.destroy(),
      }),
    );
    c.once('error', (e) => reject(e));
  });
}
