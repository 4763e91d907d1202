// Why this file exists: request/reply and events over the CONTROL channel of one transport
// session, so the source and destination code read as calls (`await peer.request(...)`) and
// handlers, not as frame plumbing. Replies are matched by `rid`; unsolicited messages (events
// such as `barrier-ok`, `running`) go to listeners. A closed session fails every waiter.
import { EventEmitter } from 'node:events';
import { FerryError, isErrorCode } from '../errors.js';
import type { Session } from '../transport/session.js';
import { CH, decodeControl, encodeControl, type Control } from './protocol.js';

type Req = Extract<Control, { rid: number }>;
type DistributiveOmit<T, K extends keyof never> = T extends unknown ? Omit<T, K> : never;

export class Peer extends EventEmitter {
  private nextRid = 1;
  private readonly waiting = new Map<number, { resolve: (m: Control) => void; reject: (e: Error) => void }>();

  constructor(readonly session: Session) {
    super();
    session.on('message', (channel: number, msg: Buffer) => {
      if (channel !== CH.CONTROL) return;
      let m: Control;
      try {
        m = decodeControl(msg);
      } catch (e) {
        this.emit('protocol-error', e);
        return;
      }
      const w = 'rid' in m ? this.waiting.get(m.rid) : undefined;
      if (w && isReply(m)) {
        this.waiting.delete(m.rid);
        if (m.t === 'error') w.reject(new FerryError(isErrorCode(m.code) ? m.code : 'INTERNAL', m.message));
        else w.resolve(m);
      } else this.emit('control', m);
    });
    session.on('close', (why: string) => {
      const e = new FerryError('TRANSPORT_CLOSED', `migration peer session closed: ${why}`);
      for (const w of this.waiting.values()) w.reject(e);
      this.waiting.clear();
      this.emit('closed', why);
    });
  }

  /** `urgent`: the switchover waits for it: sent on two connections at once (a lossy link's segment recovery costs round trips). */
  async send(m: Control, o: { urgent?: boolean } = {}): Promise<void> {
    await this.session.send(CH.CONTROL, encodeControl(m), o.urgent ? { copies: 2 } : {});
  }

  /** Sends a request and resolves with its reply (or rejects with the peer's error). */
  async request<R extends Control>(m: DistributiveOmit<Req, 'rid'>, timeoutMs = 0): Promise<R> {
    const rid = this.nextRid++;
    const p = new Promise<Control>((resolve, reject) => {
      this.waiting.set(rid, { resolve, reject });
      if (timeoutMs) {
        setTimeout(() => {
          if (this.waiting.delete(rid)) reject(new FerryError('TIMEOUT', `migration peer did not answer "${m.t}" within ${timeoutMs} ms`));
        }, timeoutMs).unref();
      }
    });
    await this.send({ ...m, rid } as Control);
    return (await p) as R;
  }

  /** Resolves with the next unsolicited message matching `pred`. */
  next<T extends Control>(pred: (m: Control) => m is T): Promise<T> {
    return new Promise((resolve, reject) => {
      const on = (m: Control) => {
        if (!pred(m)) return;
        this.off('control', on);
        this.off('closed', onClose);
        resolve(m);
      };
      const onClose = (why: string) => {
        this.off('control', on);
        reject(new FerryError('TRANSPORT_CLOSED', `migration peer session closed: ${why}`));
      };
      this.on('control', on);
      this.once('closed', onClose);
    });
  }

  reply(to: { rid: number }, m: DistributiveOmit<Req, 'rid'>): Promise<void> {
    return this.send({ ...m, rid: to.rid } as Control);
  }

  replyError(to: { rid: number }, e: unknown): Promise<void> {
    const fe = e instanceof FerryError ? e : new FerryError('INTERNAL', (e as Error).message ?? String(e));
    return this.send({ t: 'error', rid: to.rid, code: fe.code, message: fe.message });
  }
}

const REPLIES = new Set(['begin-ok', 'files-want', 'files-ok', 'prepared', 'hashes', 'ram-ready', 'ram-fixed', 'state', 'error']);
function isReply(m: Control): m is Req {
  return REPLIES.has(m.t);
}
