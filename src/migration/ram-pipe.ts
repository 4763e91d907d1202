// Why this file exists: QEMU's RAM migration stream, carried by Ferry's transport instead of a
// TCP connection QEMU would open itself. The source agent listens on a unix socket QEMU migrates
// to (`migrate unix:…`) and forwards every byte on the RAM channel, reading from QEMU only as
// fast as the transport accepts (so QEMU sees the real drain rate). The destination agent
// connects to its QEMU's `migrate-incoming unix:…` socket and writes the channel's bytes into it.
// The stream gets the transport's compression, multi-stream striping and resumption for free.
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import type { Session } from '../transport/session.js';
import { CH } from './protocol.js';

export interface RamSource {
  /** bytes read from QEMU and handed to the transport */
  bytes(): number;
  /** SHA-256 (hex) of every byte handed to the transport; final once `ended` resolved */
  digest(): string;
  /** resolves when QEMU closed the stream and every byte was queued */
  ended: Promise<void>;
  close(): void;
}

export async function listenForQemu(sockPath: string, session: Session): Promise<RamSource> {
  fs.rmSync(sockPath, { force: true });
  let bytes = 0;
  const hash = crypto.createHash('sha256');
  let digest = '';
  let endResolve!: () => void;
  const ended = new Promise<void>((r) => (endResolve = r));
  let chain = Promise.resolve();
  let conn: net.Socket | undefined;
  const server = net.createServer((c) => {
    if (conn) return c.destroy(); // one stream per migration
    conn = c;
    c.on('data', (d: Buffer) => {
      c.pause();
      chain = chain.then(async () => {
        try {
          hash.update(d);
          await session.send(CH.RAM, d);
          bytes += d.length;
        } catch {
          c.destroy();
          return;
        }
        c.resume();
      });
    });
    c.on('close', () =>
      void chain.then(() => {
        digest = hash.digest('hex');
        endResolve();
      }),
    );
    c.on('error', () => {});
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(sockPath, resolve);
  });
  return {
    bytes: () => bytes,
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
