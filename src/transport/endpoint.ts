// Why this file exists: getting connections into sessions. `listen` accepts connections and
// routes each, by the session id in its HELLO, to a new or an existing session; `dial` opens a
// session and keeps `streams` connections to the peer, re-dialling each one that dies (with
// backoff) until the session closes. Authentication is mutual TLS with pinned certificate
// fingerprints (tls.ts); plaintext exists only behind the explicit `insecureLab` flag.
import crypto from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { FerryError } from '../errors.js';
import { Decoder, encode, FrameType, type Frame } from './protocol.js';
import { DEFAULT_SESSION, Session, type SessionOptions } from './session.js';
import type { Identity } from './tls.js';

export interface Security {
  /** this host's key + certificate and the fingerprints it accepts; absent only with insecureLab */
  identity?: Identity;
  insecureLab?: boolean;
}

const HANDSHAKE_MS = 10_000;

function hello(payload: unknown, type: FrameType): Buffer {
  return encode({ type, channel: 0, flags: 0, seq: 0n, ack: 0n, payload: Buffer.from(JSON.stringify(payload)) });
}

/** Reads the first frame of a connection (bounded in time and size); the rest stays unread. */
function firstFrame(sock: Duplex): Promise<{ frame: Frame; rest: Buffer }> {
  return new Promise((resolve, reject) => {
    const dec = new Decoder();
    const t = setTimeout(() => fail(new FerryError('TRANSPORT_PROTOCOL', 'no handshake within 10 s')), HANDSHAKE_MS);
    const fail = (e: Error) => {
      cleanup();
      sock.destroy();
      reject(e);
    };
    const onData = (d: Buffer) => {
      try {
        const frame = dec.pushOne(d);
        if (frame) {
          cleanup();
          sock.pause();
          resolve({ frame, rest: Buffer.from(dec.leftover()) });
        }
      } catch (e) {
        fail(e as Error);
      }
    };
    const onClose = () => fail(new FerryError('TRANSPORT_CLOSED', 'connection closed during the handshake'));
    const cleanup = () => {
      clearTimeout(t);
      sock.off('data', onData);
      sock.off('close', onClose);
    };
    sock.on('data', onData);
    sock.on('close', onClose);
    sock.on('error', () => {});
  });
}

function adopt(session: Session, sock: Duplex, peerRecv: bigint, rest: Buffer, peerAbove: bigint[] = []): void {
  session.attach(sock, peerRecv, peerAbove);
  if (rest.length) sock.unshift(rest);
  sock.resume();
}

export interface Listener {
  server: net.Server;
  sessions: Map<string, Session>;
  close(): void;
}

export async function listen(o: { host: string; port: number; security: Security; session?: Partial<SessionOptions>; onSession: (s: Session, peer: string) => void; onRefused?: (why: string) => void }): Promise<Listener> {
  const sessions = new Map<string, Session>();
  const peers = new Map<string, string>();
  const refuse = (sock: Duplex, why: string) => {
    o.onRefused?.(why);
    sock.destroy();
  };
  const onConn = async (sock: Duplex, peer: string) => {
    try {
      const { frame, rest } = await firstFrame(sock);
      if (frame.type !== FrameType.HELLO) return refuse(sock, 'first frame is not HELLO');
      const h = JSON.parse(frame.payload.toString()) as { session?: string; resume?: boolean; recv?: string; above?: string[]; parity?: boolean };
      if (typeof h.session !== 'string' || !/^[0-9a-f]{32}$/.test(h.session)) return refuse(sock, 'malformed session id');
      let s = sessions.get(h.session);
      if (s && peers.get(h.session) !== peer) return refuse(sock, `session ${h.session} belongs to another peer`);
      if (!s) {
        if (h.resume) {
          sock.write(hello({ reason: 'unknown session' }, FrameType.CLOSE));
          return refuse(sock, `resume of unknown session ${h.session}`);
        }
        s = new Session(h.session, { ...DEFAULT_SESSION, ...o.session });
        sessions.set(h.session, s);
        peers.set(h.session, peer);
        s.on('close', () => sessions.delete(h.session!));
        o.onSession(s, peer);
      }
      s.peerParity = h.parity === true;
      sock.write(hello({ session: h.session, recv: String(s.received), above: s.receivedAbove(), parity: true }, FrameType.WELCOME));
      adopt(s, sock, BigInt(h.recv ?? '0'), rest, (h.above ?? []).map((x) => BigInt(x)));
    } catch (e) {
      refuse(sock, (e as Error).message);
    }
  };
  let server: net.Server;
  if (o.security.identity) {
    const id = o.security.identity;
    server = tls.createServer({ key: id.key, cert: id.cert, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3' }, (sock) => {
      const fp = sock.getPeerCertificate()?.fingerprint256;
      if (!fp || !id.trusted(fp)) {
        // Say why before hanging up, so the dialer stops retrying and reports it.
        o.onRefused?.(`untrusted peer certificate ${fp ?? '(none)'}`);
        sock.end(hello({ reason: `your certificate ${fp ?? '(none)'} is not trusted by this host (ferry host trust)` }, FrameType.CLOSE));
        setTimeout(() => sock.destroy(), 2000).unref();
        return;
      }
      void onConn(sock, fp);
    });
  } else if (o.security.insecureLab) {
    server = net.createServer((sock) => void onConn(sock, 'insecure-lab'));
  } else {
    throw new FerryError('INVALID_ARGUMENT', 'transport: no identity given (plaintext needs the explicit lab flag)');
  }
  server.on('tlsClientError', (e) => o.onRefused?.(e.message));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.port, o.host, resolve);
  });
  return {
    server,
    sessions,
    close: () => {
      server.close();
      for (const s of sessions.values()) s.close('listener closed');
    },
  };
}

export interface DialOptions {
  host: string;
  port: number;
  security: Security;
  /**
   * Connections kept open: a number, or 'auto' (the default): start with 2, and once the path's
   * minimum RTT is measured grow to ceil(minRTT / 6 ms), between 2 and 16 — on a long lossy path
   * one CUBIC flow carries ~MSS/(RTT·√loss), so longer paths need more flows (16 at 100 ms).
   */
  streams?: number | 'auto';
  session?: Partial<SessionOptions>;
  connectTimeoutMs?: number;
}

function connectOnce(o: DialOptions): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      sock.destroy();
      reject(new FerryError('TRANSPORT_TIMEOUT', `connect to ${o.host}:${o.port} timed out`));
    }, o.connectTimeoutMs ?? 5000);
    let sock: net.Socket;
    const id = o.security.identity;
    if (id) {
      sock = tls.connect({ host: o.host, port: o.port, key: id.key, cert: id.cert, rejectUnauthorized: false, minVersion: 'TLSv1.3' }, () => {
        clearTimeout(t);
        const fp = (sock as tls.TLSSocket).getPeerCertificate()?.fingerprint256;
        if (!fp || !id.trusted(fp)) {
          sock.destroy();
          return reject(new FerryError('PEER_UNTRUSTED', `peer ${o.host}:${o.port} presented certificate ${fp ?? '(none)'}, which is not trusted (ferry host trust …)`));
        }
        resolve(sock);
      });
    } else if (o.security.insecureLab) {
      sock = net.connect({ host: o.host, port: o.port }, () => {
        clearTimeout(t);
        resolve(sock);
      });
    } else {
      clearTimeout(t);
      return reject(new FerryError('INVALID_ARGUMENT', 'transport: no identity given (plaintext needs the explicit lab flag)'));
    }
    sock.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}

/** Opens a session: resolves once the first connection is up; keeps `streams` connections. */
export async function dial(o: DialOptions): Promise<Session> {
  const id = crypto.randomBytes(16).toString('hex');
  const session = new Session(id, { ...DEFAULT_SESSION, ...o.session });
  o = { ...o };
  session.retarget = (host, port) => {
    o.host = host;
    o.port = port;
  };
  let established = false;
  const one = async (slot: number): Promise<void> => {
    const sock = await connectOnce(o);
    sock.write(hello({ session: id, resume: established, recv: String(session.received), above: session.receivedAbove(), conn: slot, parity: true }, FrameType.HELLO));
    const { frame, rest } = await firstFrame(sock);
    if (frame.type === FrameType.CLOSE) throw new FerryError('TRANSPORT_CLOSED', `peer refused: ${frame.payload.toString()}`, { details: { refused: true } });
    if (frame.type !== FrameType.WELCOME) throw new FerryError('TRANSPORT_PROTOCOL', 'expected WELCOME');
    const w = JSON.parse(frame.payload.toString()) as { recv: string; above?: string[]; parity?: boolean };
    session.peerParity = w.parity === true;
    established = true;
    adopt(session, sock, BigInt(w.recv), rest, (w.above ?? []).map((x) => BigInt(x)));
    await new Promise<void>((r) => sock.once('close', () => r()));
  };
  const keep = async (slot: number) => {
    let backoff = 250;
    while (session.state !== 'closed') {
      try {
        const t = Date.now();
        await one(slot);
        if (Date.now() - t > 5000) backoff = 250;
      } catch (e) {
        // Only a refusal is final; a connection lost mid-handshake is retried like any other.
        if ((e as FerryError).code === 'PEER_UNTRUSTED' || (e as FerryError).details?.refused) {
          session.close((e as Error).message);
          return;
        }
      }
      if (session.isClosed()) return;
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 4000);
    }
  };
  // The first connection decides whether the peer is there at all.
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => {
      session.off('resume', onResume);
      session.close('unreachable');
      reject(new FerryError('TRANSPORT_TIMEOUT', `cannot reach ${o.host}:${o.port} within ${o.connectTimeoutMs ?? 5000} ms`));
    }, (o.connectTimeoutMs ?? 5000) + 1000);
    const onResume = () => {
      clearTimeout(t);
      session.off('close', onClose);
      resolve();
    };
    const onClose = (why: string) => {
      clearTimeout(t);
      session.off('resume', onResume);
      reject(new FerryError(/untrusted|not trusted/.test(why) ? 'PEER_UNTRUSTED' : 'TRANSPORT_CLOSED', why));
    };
    session.once('resume', onResume);
    session.once('close', onClose);
    const auto = o.streams === undefined || o.streams === 'auto';
    const initial = auto ? 2 : (o.streams as number);
    for (let i = 0; i < initial; i++) void keep(i);
    if (auto) {
      const grow = setInterval(() => {
        if (session.isClosed()) return clearInterval(grow);
        if (!session.stats.minRttMs) return;
        clearInterval(grow);
        const target = Math.min(16, Math.max(2, Math.ceil(session.stats.minRttMs / 6)));
        for (let i = initial; i < target; i++) void keep(i);
        session.emit('streams', target);
      }, 250);
      grow.unref();
    }
  });
  return session;
}
