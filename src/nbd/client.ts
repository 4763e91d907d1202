// Why this file exists: Ferry's own NBD client (no usable npm package exists). Disk pre-copy reads
// a VM's disk and its dirty bitmap from QEMU's NBD export through it, and the destination writes
// through it. Implements the parts of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md) Ferry
// needs: fixed-newstyle handshake with NO_ZEROES, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT
// (e.g. "base:allocation", "qemu:dirty-bitmap:NAME"), NBD_OPT_GO; then READ, WRITE,
// WRITE_ZEROES, FLUSH, BLOCK_STATUS and DISC, pipelined (many requests in flight, replies matched
// by cookie), with structured replies (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR*).
import net from 'node:net';
import { FerryError } from '../errors.js';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const OPT = { GO: 7, STRUCTURED_REPLY: 8, SET_META_CONTEXT: 10 } as const;
const REP = { ACK: 1, INFO: 3, META_CONTEXT: 4 } as const;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
const REPLY = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5 } as const;
/** NBD error numbers (doc/proto.md "Error values"), named for operators. */
const NBD_ERRNO: Record<number, string> = { 1: 'EPERM (not permitted)', 5: 'EIO (I/O error)', 12: 'ENOMEM (out of memory)', 22: 'EINVAL (invalid request)', 28: 'ENOSPC (no space left on device)', 75: 'EOVERFLOW (request too large)', 95: 'ENOTSUP (not supported)', 108: 'ESHUTDOWN (server shutting down)' };
const errName = (n: number) => NBD_ERRNO[n] ?? `error ${n}`;

export const TX_FLAG = { READ_ONLY: 2, SEND_FLUSH: 4, SEND_WRITE_ZEROES: 64, CAN_MULTI_CONN: 256 } as const;

export interface Extent {
  offset: number;
  length: number;
  /** context-specific flags: base:allocation 1 = hole, 2 = zero; qemu:dirty-bitmap 1 = dirty */
  flags: number;
}

interface Pending {
  resolve: (v: Buffer | Extent[] | null) => void;
  reject: (e: Error) => void;
  kind: 'read' | 'status' | 'plain';
  offset: number;
  buf?: Buffer;
  extents?: Extent[];
  error?: Error;
}

/** Reads exactly n bytes from a paused socket. */
class Reader {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: (() => void) | null = null;
  private ended: Error | null = null;

  constructor(sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      this.waiter?.();
    });
    const end = () => {
      this.ended = new FerryError('NBD_ERROR', 'NBD connection closed');
      this.waiter?.();
    };
    sock.on('close', end);
    sock.on('error', end);
  }

  async read(n: number): Promise<Buffer> {
    while (this.have < n) {
      if (this.ended) throw this.ended;
      await new Promise<void>((r) => (this.waiter = r));
      this.waiter = null;
    }
    if (n === 0) return Buffer.alloc(0);
    this.have -= n;
    const first = this.chunks[0]!;
    if (first.length >= n) {
      // The common case: no copy. (Copying every buffered chunk on each read made a deep
      // pipeline of 64 KiB reads cost its whole backlog in memcpy per reply.)
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.have += n;
    await this.readInto(out, 0, n);
    return out;
  }

  /** Reads n bytes into dst at `at`, copying as they arrive (no intermediate buffer). */
  async readInto(dst: Buffer, at: number, n: number): Promise<void> {
    while (n > 0) {
      while (this.have === 0) {
        if (this.ended) throw this.ended;
        await new Promise<void>((r) => (this.waiter = r));
        this.waiter = null;
      }
      const c = this.chunks[0]!;
      const take = Math.min(c.length, n);
      c.copy(dst, at, 0, take);
      at += take;
      n -= take;
      this.have -= take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
  }
}

export class NbdClient {
  private nextCookie = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private closed = false;
  size = 0;
  txFlags = 0;
  /** meta context name → id the server assigned */
  readonly contexts = new Map<string, number>();

  private constructor(private readonly sock: net.Socket, private readonly rd: Reader) {}

  /**
   * Connects and negotiates. `target` is {path} for a unix socket or {host, port}; `contexts`
   * are meta contexts to select for BLOCK_STATUS (empty: none).
   */
  static async connect(target: { path: string } | { host: string; port: number }, exportName: string, contexts: string[] = []): Promise<NbdClient> {
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = 'path' in target ? net.connect(target.path) : net.connect(target.port, target.host);
      s.once('connect', () => resolve(s));
      s.once('error', (e) => reject(new FerryError('NBD_ERROR', `cannot connect to NBD server: ${e.message}`)));
    });
    sock.setNoDelay(true);
    const c = new NbdClient(sock, new Reader(sock));
    try {
      await c.handshake(exportName, contexts);
    } catch (e) {
      sock.destroy();
      throw e;
    }
    void c.replyLoop();
    return c;
  }

  private async handshake(exportName: string, contexts: string[]): Promise<void> {
    const hello = await this.rd.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new FerryError('NBD_ERROR', 'not a fixed-newstyle NBD server');
    const hflags = hello.readUInt16BE(16);
    if (!(hflags & 1)) throw new FerryError('NBD_ERROR', 'server lacks fixed newstyle negotiation');
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(1 | (hflags & 2)); // FIXED_NEWSTYLE, and NO_ZEROES when offered
    this.sock.write(cflags);

    await this.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
    const name = Buffer.from(exportName);
    if (contexts.length) {
      const qs = contexts.map((q) => Buffer.from(q));
      const data = Buffer.concat([u32(name.length), name, u32(qs.length), ...qs.flatMap((q) => [u32(q.length), q])]);
      for (const r of await this.option(OPT.SET_META_CONTEXT, data)) {
        if (r.type === REP.META_CONTEXT) this.contexts.set(r.data.subarray(4).toString(), r.data.readUInt32BE(0));
      }
      for (const q of contexts) if (!this.contexts.has(q)) throw new FerryError('NBD_ERROR', `NBD server does not offer meta context ${q}`);
    }
    const go = Buffer.concat([u32(name.length), name, u16(0)]);
    for (const r of await this.option(OPT.GO, go)) {
      if (r.type === REP.INFO && r.data.readUInt16BE(0) === 0) {
        this.size = Number(r.data.readBigUInt64BE(2));
        this.txFlags = r.data.readUInt16BE(10);
      }
    }
  }

  /** Sends one option and collects its replies up to ACK; error replies throw. */
  private async option(opt: number, data: Buffer): Promise<{ type: number; data: Buffer }[]> {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([h, data]));
    const out: { type: number; data: Buffer }[] = [];
    for (;;) {
      const r = await this.rd.read(20);
      if (r.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new FerryError('NBD_ERROR', 'bad option reply magic');
      const type = r.readUInt32BE(12);
      const len = r.readUInt32BE(16);
      if (len > 1 << 20) throw new FerryError('NBD_ERROR', 'option reply too large');
      const body = Buffer.from(await this.rd.read(len));
      if (type & 0x80000000) throw new FerryError('NBD_ERROR', `NBD server refused option ${opt} (error ${type & 0x7fffffff}${body.length ? `: ${body.toString()}` : ''})`);
      if (type === REP.ACK) return out;
      out.push({ type, data: body });
    }
  }

  private request(cmd: number, offset: number, length: number, kind: Pending['kind'], data?: Buffer, flags = 0): Promise<Buffer | Extent[] | null> {
    if (this.closed) return Promise.reject(new FerryError('NBD_ERROR', 'NBD connection is closed'));
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(cmd, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { resolve, reject, kind, offset, ...(kind === 'read' ? { buf: Buffer.alloc(length) } : {}), ...(kind === 'status' ? { extents: [] } : {}) });
      this.sock.write(data ? Buffer.concat([h, data]) : h);
    });
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.request(CMD.READ, offset, length, 'read')) as Buffer;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.request(CMD.WRITE, offset, data.length, 'plain', data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, offset, length, 'plain');
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0, 'plain');
  }

  /** Extents of `context` covering [offset, offset+length) (the server may return fewer). */
  async blockStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    const id = this.contexts.get(context);
    if (id === undefined) throw new FerryError('NBD_ERROR', `meta context ${context} was not negotiated`);
    const all = (await this.request(CMD.BLOCK_STATUS, offset, length, 'status')) as Extent[];
    return all.filter((e) => (e as Extent & { ctx?: number }).ctx === id).map(({ offset: o, length: l, flags }) => ({ offset: o, length: l, flags }));
  }

  /** Every extent of `context` over the whole export, walking block status. */
  async map(context: string, chunk = 1 << 30): Promise<Extent[]> {
    const out: Extent[] = [];
    for (let off = 0; off < this.size; ) {
      const ex = await this.blockStatus(context, off, Math.min(chunk, this.size - off));
      if (!ex.length) throw new FerryError('NBD_ERROR', `no block status at ${off}`);
      for (const e of ex) {
        const last = out[out.length - 1];
        if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
        else out.push({ ...e });
        off = e.offset + e.length;
      }
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(CMD.DISC, 6);
    this.sock.end(h);
    this.closed = true;
  }

  private fail(e: Error): void {
    this.closed = true;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const m = (await this.rd.read(4)).readUInt32BE(0);
        if (m === SIMPLE_REPLY_MAGIC) {
          const r = await this.rd.read(12);
          const err = r.readUInt32BE(0);
          const cookie = r.readBigUInt64BE(4);
          const p = this.take(cookie);
          if (err) p.reject(new FerryError('NBD_ERROR', `NBD request failed: ${errName(err)}`));
          else if (p.kind === 'read') {
            await this.rd.readInto(p.buf!, 0, p.buf!.length);
            p.resolve(p.buf!);
          } else p.resolve(null);
        } else if (m === STRUCTURED_REPLY_MAGIC) {
          const r = await this.rd.read(16);
          const flags = r.readUInt16BE(0);
          const type = r.readUInt16BE(2);
          const cookie = r.readBigUInt64BE(4);
          const len = r.readUInt32BE(12);
          const p = this.pending.get(cookie);
          if (!p) throw new FerryError('NBD_ERROR', `reply for unknown cookie ${cookie}`);
          if (type === REPLY.OFFSET_DATA) {
            // Data goes straight from the socket's buffers into the request's buffer: one copy.
            const at = Number((await this.rd.read(8)).readBigUInt64BE(0)) - p.offset;
            if (len < 8 || at < 0 || at + len - 8 > p.buf!.length) throw new FerryError('NBD_ERROR', `read reply outside its request (offset ${at}, ${len - 8} bytes)`);
            await this.rd.readInto(p.buf!, at, len - 8);
            if (flags & 1) {
              this.take(cookie);
              if (p.error) p.reject(p.error);
              else p.resolve(p.buf!);
            }
            continue;
          }
          const body = Buffer.from(await this.rd.read(len));
          if (type === REPLY.OFFSET_HOLE) p.buf!.fill(0, Number(body.readBigUInt64BE(0)) - p.offset, Number(body.readBigUInt64BE(0)) - p.offset + body.readUInt32BE(8));
          else if (type === REPLY.BLOCK_STATUS) {
            const ctx = body.readUInt32BE(0);
            let off = p.offset + (p.extents!.filter((e) => (e as Extent & { ctx?: number }).ctx === ctx).reduce((a, e) => a + e.length, 0));
            for (let i = 4; i + 8 <= body.length; i += 8) {
              const l = body.readUInt32BE(i);
              p.extents!.push({ offset: off, length: l, flags: body.readUInt32BE(i + 4), ctx } as Extent);
              off += l;
            }
          } else if (type & 0x8000) {
            const msgLen = body.length >= 6 ? body.readUInt16BE(4) : 0;
            p.error = new FerryError('NBD_ERROR', `NBD request failed: ${errName(body.readUInt32BE(0))}${msgLen ? `: ${body.subarray(6, 6 + msgLen).toString()}` : ''}`);
          } else if (type !== REPLY.NONE) throw new FerryError('NBD_ERROR', `unknown structured reply type ${type}`);
          if (flags & 1) {
            this.take(cookie);
            if (p.error) p.reject(p.error);
            else p.resolve(p.kind === 'read' ? p.buf! : p.kind === 'status' ? p.extents! : null);
          }
        } else throw new FerryError('NBD_ERROR', `bad reply magic 0x${m.toString(16)}`);
      }
    } catch (e) {
      this.fail(e as Error);
    }
  }

  private take(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new FerryError('NBD_ERROR', `reply for unknown cookie ${cookie}`);
    this.pending.delete(cookie);
    return p;
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
