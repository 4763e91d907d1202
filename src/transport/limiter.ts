// Why this file exists: bandwidth caps. A token bucket (bytes/s, burst). Sessions sharing one
// bucket share the cap fairly: when tokens run short, waiting sessions queue and are served in
// turn (each re-queues after its frame), so no session's retry timer can starve another's.
export class TokenBucket {
  private tokens: number;
  private last = performance.now();
  private readonly queue: object[] = [];
  private readonly lastAsk = new Map<object, number>();

  constructor(public rateBytesPerSec: number, private readonly burst = Math.max(64 * 1024, rateBytesPerSec / 20)) {
    this.tokens = burst;
  }

  /**
   * Takes `n` bytes' worth of tokens for `owner`: 0 if taken now, else ms to wait before
   * asking again. Owners that stopped asking for 2 s lose their place.
   */
  take(n: number, owner: object = this): number {
    if (!this.rateBytesPerSec) return 0;
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rateBytesPerSec);
    this.last = now;
    this.lastAsk.set(owner, now);
    while (this.queue.length && now - (this.lastAsk.get(this.queue[0]!) ?? 0) > 2000) this.queue.shift();
    const turn = this.queue.length === 0 || this.queue[0] === owner;
    if (turn && (this.tokens >= n || this.tokens >= this.burst)) {
      this.tokens -= n;
      if (this.queue[0] === owner) this.queue.shift();
      return 0;
    }
    if (!this.queue.includes(owner)) this.queue.push(owner);
    const position = this.queue.indexOf(owner);
    return Math.max(1, ((n - Math.min(this.tokens, n)) / this.rateBytesPerSec) * 1000 + position * ((n / this.rateBytesPerSec) * 1000));
  }

  /** A closed session gives up its place. */
  forget(owner: object): void {
    const i = this.queue.indexOf(owner);
    if (i >= 0) this.queue.splice(i, 1);
    this.lastAsk.delete(owner);
  }
}
