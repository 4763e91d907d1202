// Why this file exists: the model of one direction of an emulated WAN link, with no I/O and no
// clock of its own (callers pass `now` in ms), so it is exact under unit test. The relay
// (relay.ts) asks it, for each packet, "drop it, or deliver it at what time?".
//
// Per packet, in order:
//   1. queue    drop-tail: the bytes still waiting to be serialized + this one > queueBytes
//   2. serialize  the packet occupies the line for size*8/rate (a real link's pacing)
//   3. loss     i.i.d. with probability `loss`, or Gilbert–Elliott (two-state Markov chain:
//               good/bad with per-state loss) when `ge` is set; a lost packet still used the line
//   4. deliver  at end-of-serialization + delay + jitter (uniform in ±jitter); FIFO order is kept
//               unless the packet is picked for reordering (probability `reorder`), which lets it
//               overtake by up to half the delay, as a parallel path would
// Outages and flow forgetting are the relay's business (they act on all directions at once).

export interface GilbertElliott {
  /** P(good → bad) per packet. */
  pGoodBad: number;
  /** P(bad → good) per packet. */
  pBadGood: number;
  lossGood: number;
  lossBad: number;
}

export interface LinkParams {
  /** bits per second; 0 = unlimited. */
  rateBps: number;
  /** one-way delay, ms. */
  delayMs: number;
  /** uniform jitter, ± ms. */
  jitterMs: number;
  /** i.i.d. loss probability (ignored when `ge` is set). */
  loss: number;
  ge: GilbertElliott | null;
  /** probability that a packet may overtake earlier ones. */
  reorder: number;
  /** drop-tail limit of the serialization queue, bytes. */
  queueBytes: number;
}

export type DropReason = 'queue' | 'loss' | 'outage' | 'flow';

export interface DirectionCounters {
  packets: number;
  bytes: number;
  deliveredPackets: number;
  deliveredBytes: number;
  dropped: Record<DropReason, number>;
}

export function emptyCounters(): DirectionCounters {
  return { packets: 0, bytes: 0, deliveredPackets: 0, deliveredBytes: 0, dropped: { queue: 0, loss: 0, outage: 0, flow: 0 } };
}

/** mulberry32: small, fast, seedable; reproducible runs need nothing better. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function seedFor(seed: number, label: string): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

export class LinkDirection {
  readonly counters = emptyCounters();
  private nextFree = 0;
  private lastDelivery = 0;
  private bad = false;
  private readonly random: () => number;

  constructor(public params: LinkParams, seed: number) {
    this.random = rng(seed);
  }

  /** Bytes waiting for the line at time `now`. */
  backlogBytes(now: number): number {
    if (!this.params.rateBps) return 0;
    return Math.max(0, this.nextFree - now) * (this.params.rateBps / 8000);
  }

  /**
   * Decides one packet's fate: a delivery time (ms, same clock as `now`) or a drop reason.
   * `forced` is a drop the relay decided (outage, forgotten flow): counted, nothing else.
   */
  admit(now: number, size: number, forced?: 'outage' | 'flow'): number | DropReason {
    const p = this.params;
    this.counters.packets++;
    this.counters.bytes += size;
    if (forced) return this.drop(forced);
    if (p.rateBps && this.backlogBytes(now) + size > p.queueBytes) return this.drop('queue');
    const start = Math.max(now, this.nextFree);
    const end = p.rateBps ? start + (size * 8000) / p.rateBps : start;
    this.nextFree = end;
    if (this.lost()) return this.drop('loss');
    let at = end + p.delayMs + (p.jitterMs ? (this.random() * 2 - 1) * p.jitterMs : 0);
    if (p.reorder > 0 && this.random() < p.reorder) {
      at = Math.max(end, at - this.random() * (p.delayMs / 2));
    } else {
      at = Math.max(at, this.lastDelivery);
      this.lastDelivery = at;
    }
    this.counters.deliveredPackets++;
    this.counters.deliveredBytes += size;
    return at;
  }

  /** A packet admitted for delivery was lost after all (the link went down under it). */
  retract(size: number): void {
    this.counters.deliveredPackets--;
    this.counters.deliveredBytes -= size;
    this.counters.dropped.outage++;
  }

  private drop(reason: DropReason): DropReason {
    this.counters.dropped[reason]++;
    return reason;
  }

  private lost(): boolean {
    const ge = this.params.ge;
    if (ge) {
      if (this.bad) {
        if (this.random() < ge.pBadGood) this.bad = false;
      } else if (this.random() < ge.pGoodBad) this.bad = true;
      return this.random() < (this.bad ? ge.lossBad : ge.lossGood);
    }
    return this.params.loss > 0 && this.random() < this.params.loss;
  }
}
