// Why this file exists: bandwidth caps. A token bucket (bytes/s, burst); sessions sharing one
// bucket share the cap, and since each session's pump takes tokens a frame at a time and retries
// on a timer, concurrent sessions get roughly equal turns.
export class TokenBucket {
  private tokens: number;
  private last = performance.now();

  constructor(public rateBytesPerSec: number, private readonly burst = Math.max(64 * 1024, rateBytesPerSec / 20)) {
    this.tokens = burst;
  }

  /** Takes `n` bytes' worth of tokens: 0 if taken now, else ms to wait before trying again. */
  take(n: number): number {
    if (!this.rateBytesPerSec) return 0;
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rateBytesPerSec);
    this.last = now;
    if (this.tokens >= n || this.tokens >= this.burst) {
      this.tokens -= n;
      return 0;
    }
    return ((n - this.tokens) / this.rateBytesPerSec) * 1000;
  }
}
