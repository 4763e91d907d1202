// Ferry transport protocol, version 1 — the wire format between two agents. This comment is the
// specification; this file is its only implementation (encoder + streaming decoder).
//
// A *session* joins two agents. It rides on one or more TCP connections (TLS 1.3, mutually
// authenticated, peers pinned by certificate fingerprint; plaintext only with the explicit lab
// flag). Every connection carries a stream of frames:
//
//   offset size  field
//   0      1     version   = 1 (0 is invalid; a peer refuses versions it does not speak)
//   1      1     type      (0 is invalid; see FrameType)
//   2      2     channel   application channel (0 = transport itself; 1 control, 2 ram, 3 disk, 4 bulk)
//   4      4     flags     DATA: ZSTD=1 BROTLI=2 ZERO=4 REF=8 CACHE=16; others: 0
//   8      8     seq       DATA: the session-wide sequence number of this frame (per direction, from 1)
//   16     8     ack       every frame: the sender's highest in-order DATA seq received (cumulative)
//   24     8     cseq      DATA: sequence number within its channel (from 1); others: 0
//   32     4     length    payload bytes, ≤ MAX_PAYLOAD
//   36     4     crc32     CRC-32 (zlib) of bytes 0..35 and the payload
//   40     …     payload
//   (all integers big-endian)
//
// Frame types:
//   HELLO   (1) client → server, first frame of every connection. Payload JSON
//               {session: 32 hex, resume: bool, recv: seq, above: [seq…], conn: index, parity: bool}.
//               `above` lists DATA seqs received beyond `recv` (a selective ack, ≤ 4096).
//   WELCOME (2) server → client reply. Payload JSON {session, recv, above, parity}. An unknown session with
//               resume=true, or a session of another peer, is answered with CLOSE and dropped.
//   DATA    (3) one application message (≤ 1 MiB before reduction). ZERO: payload is a u32
//               length of zero bytes. REF: payload is a 32-byte SHA-256 the receiver holds.
//               CACHE: the receiver keeps the message under its SHA-256 for later REFs.
//               ZSTD/BROTLI: payload is compressed.
//   ACK     (4) `ack` says what was received in order; the payload lists up to 1024 more DATA
//               seqs received beyond it (u64 each, a selective ack), so one connection's lost
//               segment does not hold the other connections' frames in the sender's window.
//   PING    (5) / PONG (6): payload 8 bytes (sender's clock, echoed); liveness + RTT.
//   CLOSE   (7) payload JSON {reason}; the session ends (not just this connection).
//   HAVE    (8) payload: n × 32-byte SHA-256 (n ≤ 32768) of content the sender already holds
//               (templates, backups, an earlier attempt); the peer may send such content as REF.
//               Unreliable by design: a lost HAVE only costs bandwidth, never correctness.
//   PARITY  (9) forward error correction over up to 64 DATA frames sent on distinct connections
//               (parity.ts): u16 n, n × {u64 seq, u32 length}, then the XOR of the members'
//               canonical encodings (this header with ack = 0, and the payload), zero-padded to
//               the longest. A receiver missing exactly one member rebuilds it from the others
//               (its CRC checks the result) without waiting for its connection's TCP recovery.
//               Sent only to a peer whose HELLO/WELCOME said `parity: true`; unreliable by
//               design, like HAVE.
//
// State of a session (each side):
//
//     dial/accept ──HELLO/WELCOME──▶ OPEN ◀──────────────┐ a connection re-dialled:
//                                     │  all connections │ HELLO{resume, recv, above} /
//                                     ▼  lost            │ WELCOME{recv, above}; DATA the
//                                  STALLED ─────────────┘ peer lacks is resent
//                                     │ no connection for `resumeLimitMs` (default 10 min)
//                                     ▼
//     CLOSE sent or received ──▶   CLOSED   (pending sends fail with TRANSPORT_CLOSED)
//
// Delivery: DATA frames are striped over the connections. `seq` makes them reliable (cumulative
// acks, resends, duplicates dropped by seq); `cseq` orders delivery within a channel, so a
// control message is not held behind bulk data queued earlier on another channel. Each channel
// is delivered in order, exactly once. The sender keeps every DATA
// frame until it is acked (cumulatively, or selectively by an ACK's list), bounded by a window of
// 4 × the measured bandwidth-delay product (≥ 1 MiB) so that little is stranded in dead sockets
// (backpressure on send()). Frames are striped onto the connection with the fewest
// unacknowledged bytes.
// Versions: a new version adds types/flags; a peer receiving a version it does not speak closes
// the connection with CLOSE {reason: "version"}. Optional frame types within a version are
// offered in HELLO/WELCOME and sent only to a peer that offered them (PARITY: `parity: true`).
import zlib from 'node:zlib';
import { FerryError } from '../errors.js';

export const VERSION = 1;
export const HEADER = 40;
export const MAX_PAYLOAD = 2 * 1024 * 1024;

export enum FrameType {
  HELLO = 1,
  WELCOME = 2,
  DATA = 3,
  ACK = 4,
  PING = 5,
  PONG = 6,
  CLOSE = 7,
  HAVE = 8,
  PARITY = 9,
}

export const Flag = { ZSTD: 1, BROTLI: 2, ZERO: 4, REF: 8, CACHE: 16 } as const;
const KNOWN_FLAGS = 31;

export interface Frame {
  type: FrameType;
  channel: number;
  flags: number;
  seq: bigint;
  ack: bigint;
  /** DATA: order within the channel; 0 otherwise (optional when encoding non-DATA frames) */
  cseq?: bigint;
  payload: Buffer;
}

export function encode(f: Frame): Buffer {
  if (f.payload.length > MAX_PAYLOAD) throw new FerryError('INVALID_ARGUMENT', `frame payload ${f.payload.length} exceeds ${MAX_PAYLOAD}`);
  const b = Buffer.allocUnsafe(HEADER + f.payload.length);
  b[0] = VERSION;
  b[1] = f.type;
  b.writeUInt16BE(f.channel, 2);
  b.writeUInt32BE(f.flags >>> 0, 4);
  b.writeBigUInt64BE(f.seq, 8);
  b.writeBigUInt64BE(f.ack, 16);
  b.writeBigUInt64BE(f.cseq ?? 0n, 24);
  b.writeUInt32BE(f.payload.length, 32);
  f.payload.copy(b, HEADER);
  b.writeUInt32BE(crcOf(b.subarray(0, 36), f.payload), 36);
  return b;
}

function crcOf(head: Buffer, payload: Buffer): number {
  return zlib.crc32(payload, zlib.crc32(head)) >>> 0;
}

export class ProtocolError extends FerryError {
  constructor(message: string) {
    super('TRANSPORT_PROTOCOL', message);
  }
}

/**
 * Streaming decoder: push() bytes as they arrive, get whole frames. Throws ProtocolError on
 * anything malformed (then the connection must be dropped). Memory is bounded by one frame.
 */
export class Decoder {
  private buf: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Frame[] {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: Frame[] = [];
    let f: Frame | null;
    while ((f = this.next())) out.push(f);
    return out;
  }

  /** Decodes at most one frame from what is buffered plus `chunk` (handshakes use this). */
  pushOne(chunk: Buffer): Frame | null {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    return this.next();
  }

  /** Bytes received but not yet decoded. */
  leftover(): Buffer {
    return this.buf;
  }

  private next(): Frame | null {
    {
      if (this.buf.length < HEADER) return null;
      const b = this.buf;
      if (b[0] !== VERSION) throw new ProtocolError(`unsupported protocol version ${b[0]}`);
      const type = b[1]!;
      if (type < FrameType.HELLO || type > FrameType.PARITY) throw new ProtocolError(`invalid frame type ${type}`);
      const flags = b.readUInt32BE(4);
      if (flags & ~KNOWN_FLAGS || (type !== FrameType.DATA && flags)) throw new ProtocolError(`invalid flags ${flags} for type ${type}`);
      const len = b.readUInt32BE(32);
      if (len > MAX_PAYLOAD) throw new ProtocolError(`frame length ${len} exceeds ${MAX_PAYLOAD}`);
      if (b.length < HEADER + len) return null;
      const payload = b.subarray(HEADER, HEADER + len);
      if (crcOf(b.subarray(0, 36), payload) !== b.readUInt32BE(36)) throw new ProtocolError('frame checksum mismatch');
      this.buf = b.subarray(HEADER + len);
      return { type, channel: b.readUInt16BE(2), flags, seq: b.readBigUInt64BE(8), ack: b.readBigUInt64BE(16), cseq: b.readBigUInt64BE(24), payload: Buffer.from(payload) };
    }
  }

  get buffered(): number {
    return this.buf.length;
  }
}

export const CHANNELS = { control: 1, ram: 2, disk: 3, bulk: 4 } as const;
/** Lower sends first. */
export const PRIORITY: Record<number, number> = { 0: 0, 1: 0, 2: 1, 3: 2, 4: 3 };
