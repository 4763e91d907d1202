// Why this file exists: the agent's HTTP plumbing — bearer-token authentication (constant-time
// compare), a tiny method+path router, bounded JSON body parsing, and the error contract: every
// failure is answered as {code, message} with the HTTP status of its code (see errors.ts).
import crypto from 'node:crypto';
import http from 'node:http';
import { FerryError, asFerryError } from '../errors.js';

export interface Req {
  method: string;
  path: string;
  params: Record<string, string>;
  query: URLSearchParams;
  body: Record<string, unknown>;
  raw: http.IncomingMessage;
  res: http.ServerResponse;
}

/** A handler returns a JSON-able value, or `undefined` when it wrote the response itself. */
export type Handler = (req: Req) => Promise<unknown> | unknown;

interface Route {
  method: string;
  re: RegExp;
  keys: string[];
  handler: Handler;
}

export class Router {
  private readonly routes: Route[] = [];

  add(method: string, pattern: string, handler: Handler): this {
    const keys: string[] = [];
    const re = new RegExp('^' + pattern.replace(/:([a-zA-Z]+)/g, (_, k: string) => (keys.push(k), '([^/]+)')) + '$');
    this.routes.push({ method, re, keys, handler });
    return this;
  }

  match(method: string, path: string): { handler: Handler; params: Record<string, string> } | undefined {
    for (const r of this.routes) {
      if (r.method !== method) continue;
      const m = r.re.exec(path);
      if (!m) continue;
      const params: Record<string, string> = {};
      r.keys.forEach((k, i) => (params[k] = decodeURIComponent(m[i + 1]!)));
      return { handler: r.handler, params };
    }
    return undefined;
  }
}

const MAX_BODY = 1024 * 1024;

function readBody(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new FerryError('INVALID_ARGUMENT', `request body exceeds ${MAX_BODY} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (size === 0) return resolve({});
      try {
        const v = JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
        if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
        resolve(v as Record<string, unknown>);
      } catch {
        reject(new FerryError('INVALID_ARGUMENT', 'request body must be a JSON object'));
      }
    });
    req.on('error', reject);
  });
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export function tokenMatches(expected: string, header: string | undefined): boolean {
  const m = /^Bearer (.+)$/.exec(header ?? '');
  if (!m) return false;
  const a = crypto.createHash('sha256').update(m[1]!).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

export function createServer(router: Router, token: string, log: (m: string) => void): http.Server {
  return http.createServer(async (raw, res) => {
    const url = new URL(raw.url ?? '/', 'http://agent');
    try {
      if (!tokenMatches(token, raw.headers.authorization)) {
        throw new FerryError('UNAUTHENTICATED', 'missing or wrong API token (Authorization: Bearer …)');
      }
      const m = router.match(raw.method ?? 'GET', url.pathname);
      if (!m) throw new FerryError('NOT_FOUND', `no route ${raw.method} ${url.pathname}`);
      const body = raw.method === 'POST' || raw.method === 'PUT' ? await readBody(raw) : {};
      const out = await m.handler({ method: raw.method ?? 'GET', path: url.pathname, params: m.params, query: url.searchParams, body, raw, res });
      if (out !== undefined && !res.headersSent) sendJson(res, 200, out);
    } catch (e) {
      const err = asFerryError(e);
      if (err.code === 'INTERNAL') log(`internal error on ${raw.method} ${url.pathname}: ${(e as Error)?.stack ?? String(e)}`);
      if (!res.headersSent) sendJson(res, err.status, err.toJSON());
      else res.end();
    }
  });
}
