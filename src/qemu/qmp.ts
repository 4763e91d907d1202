// Why this file exists: Ferry drives QEMU only through QMP, and no usable npm client exists.
// This is the one QMP client. Protocol (QEMU docs/interop/qmp-spec): line-delimited JSON over a
// unix socket; the server greets with {"QMP":{...}}, the client sends qmp_capabilities, then
// commands {"execute", "arguments", "id"}; replies {"return"|"error", "id"} and asynchronous
// {"event", "data", "timestamp"} messages arrive interleaved.
//
// Guarantees: every command resolves or rejects exactly once — with its reply, a QMP_ERROR
// (QEMU's error class and description), a QMP_TIMEOUT, or QMP_DISCONNECTED when the socket
// closes. Events are delivered in arrival order to 'event' listeners and to waitEvent().
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { FerryError } from '../errors.js';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export interface QmpOptions {
  /** Default per-command timeout (ms). */
  timeoutMs?: number;
}

export class QmpClient extends EventEmitter {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  greeting: Record<string, unknown> | undefined;
  readonly defaultTimeoutMs: number;

  private constructor(private readonly sock: net.Socket, opts: QmpOptions) {
    super();
    this.defaultTimeoutMs = opts.timeoutMs ?? 30_000;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('close', () => this.onClose());
    sock.on('error', () => {
      /* 'close' follows and rejects what is pending */
    });
  }

  /**
   * Connects to a QMP unix socket, retrying until `connectTimeoutMs` while QEMU creates it,
   * then performs the greeting and capabilities negotiation.
   */
  static async connect(path: string, opts: QmpOptions & { connectTimeoutMs?: number } = {}): Promise<QmpClient> {
    const deadline = Date.now() + (opts.connectTimeoutMs ?? 10_000);
    let lastErr: unknown;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const c = new QmpClient(sock, opts);
        await c.handshake(Math.max(1000, deadline - Date.now()));
        return c;
      } catch (e) {
        lastErr = e;
        if (e instanceof FerryError && e.code === 'QMP_ERROR') throw e;
        if (Date.now() >= deadline) break;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    throw new FerryError('QMP_DISCONNECTED', `cannot connect to QMP socket ${path}: ${String((lastErr as Error)?.message ?? lastErr)}`, {
      cause: lastErr,
    });
  }

  private async handshake(timeoutMs: number): Promise<void> {
    const greeting = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const t = setTimeout(() => reject(new FerryError('QMP_TIMEOUT', 'no QMP greeting')), timeoutMs);
      this.once('greeting', (g: Record<string, unknown>) => {
        clearTimeout(t);
        resolve(g);
      });
      this.once('close', () => {
        clearTimeout(t);
        reject(new FerryError('QMP_DISCONNECTED', 'QMP socket closed before the greeting'));
      });
    });
    this.greeting = greeting;
    await this.execute('qmp_capabilities');
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Sends a command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    if (this.closed) return Promise.reject(new FerryError('QMP_DISCONNECTED', `QMP connection is closed (command ${command})`));
    const id = String(this.nextId++);
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const ms = timeoutMs ?? this.defaultTimeoutMs;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new FerryError('QMP_TIMEOUT', `QEMU did not answer ${command} within ${ms} ms`, { details: { command } }));
      }, ms);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /** Resolves with the first event named `name` (matching `match`, if given) after this call. */
  waitEvent(name: string, timeoutMs: number, match?: (data: Record<string, unknown>) => boolean): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (ev: QmpEvent) => {
        if (ev.event !== name || (match && !match(ev.data))) return;
        cleanup();
        resolve(ev);
      };
      const onClose = () => {
        cleanup();
        reject(new FerryError('QMP_DISCONNECTED', `QMP closed while waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new FerryError('QMP_TIMEOUT', `no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      this.on('event', onEvent);
      this.once('close', onClose);
    });
  }

  close(): void {
    this.sock.destroy();
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(line);
    }
    if (this.buf.length > 16 * 1024 * 1024) {
      // A peer that never sends a newline is not QEMU: refuse to buffer without bound.
      this.sock.destroy(new Error('QMP line too long'));
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.emit('protocol-error', line);
      return;
    }
    if ('QMP' in msg) {
      this.emit('greeting', msg.QMP as Record<string, unknown>);
      return;
    }
    if (typeof msg.event === 'string') {
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown>) ?? {},
        timestamp: (msg.timestamp as QmpEvent['timestamp']) ?? { seconds: 0, microseconds: 0 },
      };
      this.emit('event', ev);
      return;
    }
    const id = msg.id === undefined ? undefined : String(msg.id);
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) {
      this.emit('protocol-error', line);
      return;
    }
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(
        new FerryError('QMP_ERROR', `${p.command}: ${err.desc ?? 'unknown error'}`, {
          details: { command: p.command, class: err.class ?? 'GenericError' },
        }),
      );
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new FerryError('QMP_DISCONNECTED', `QMP connection closed while waiting for ${p.command}`));
      this.pending.delete(id);
    }
    this.emit('close');
  }
}
