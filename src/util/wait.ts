// Why this file exists: the one way Ferry waits for something to become true (an agent coming
// up, a guest booting, a job ending): poll with a bound, never forever.
import { FerryError } from '../errors.js';

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Calls `fn` every `everyMs` until it returns something other than undefined, and returns that.
 * Errors thrown by `fn` are retried too (the thing may not be up yet) unless `retryErrors` is
 * false. After `ms` it throws TIMEOUT naming `what` and the last error.
 */
export async function waitFor<T>(what: string, ms: number, fn: () => Promise<T | undefined> | T | undefined, o: { everyMs?: number; retryErrors?: boolean } = {}): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (e) {
      if (o.retryErrors === false) throw e;
      last = e;
    }
    if (Date.now() > deadline) {
      throw new FerryError('TIMEOUT', `gave up after ${Math.round(ms / 1000)} s waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`, { cause: last });
    }
    await sleep(o.everyMs ?? 200);
  }
}
