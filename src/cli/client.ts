// Why this file exists: the CLI's (and tests') typed client for the agent's HTTP API. It finds
// the agent the way an operator expects: --host/--token, else FERRY_HOST/FERRY_TOKEN, else the
// local agent's config and token file in the data dir. API errors come back as FerryErrors with
// the agent's stable code.
import fs from 'node:fs';
import { files } from '../config.js';
import { FerryError, isErrorCode } from '../errors.js';

export interface ClientOptions {
  host?: string;
  token?: string;
  dataDir: string;
}

export class AgentClient {
  readonly base: string;
  private readonly token: string;

  constructor(opts: ClientOptions) {
    const f = files(opts.dataDir);
    let host = opts.host ?? process.env.FERRY_HOST;
    if (!host) {
      try {
        host = `http://${(JSON.parse(fs.readFileSync(f.config, 'utf8')) as { listen: string }).listen}`;
      } catch {
        host = 'http://127.0.0.1:7450';
      }
    }
    this.base = host.replace(/\/+$/, '');
    let token = opts.token ?? process.env.FERRY_TOKEN;
    if (!token) {
      try {
        token = fs.readFileSync(f.token, 'utf8').trim();
      } catch {
        token = '';
      }
    }
    this.token = token;
  }

  async request<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.raw(method, path, body);
    const text = await res.text();
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = text;
    }
    if (!res.ok) {
      const e = parsed as { code?: string; message?: string } | undefined;
      const code = isErrorCode(e?.code) ? e.code : 'INTERNAL';
      throw new FerryError(code, e?.message ?? `HTTP ${res.status} from agent`);
    }
    return parsed as T;
  }

  async raw(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
    const send = () =>
      fetch(this.base + path, {
        method,
        headers: { authorization: `Bearer ${this.token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
        body: body === undefined ? undefined : JSON.stringify(body),
        ...(signal ? { signal } : {}),
      });
    try {
      try {
        return await send();
      } catch (e) {
        // A kept-alive connection the agent closed just as this request reused it ("other side
        // closed"; seen once in CI under load). A GET changes nothing, so it is sent again once.
        if (method !== 'GET' || (e as Error).name === 'AbortError' || (e as { cause?: { code?: string } }).cause?.code !== 'UND_ERR_SOCKET') throw e;
        return await send();
      }
    } catch (e) {
      if ((e as Error).name === 'AbortError') throw e;
      throw new FerryError('AGENT_UNREACHABLE', `cannot reach the agent at ${this.base} (is \`ferry agent run\` running?): ${(e as Error & { cause?: Error }).cause?.message ?? (e as Error).message}`, { cause: e });
    }
  }

  get = <T = unknown>(path: string) => this.request<T>('GET', path);
  post = <T = unknown>(path: string, body: unknown = {}) => this.request<T>('POST', path, body);
  del = <T = unknown>(path: string) => this.request<T>('DELETE', path);
}
