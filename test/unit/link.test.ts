// The link model, exactly, on a fake clock: pacing, drop-tail, delay/jitter/FIFO, i.i.d. and
// Gilbert–Elliott loss, reordering, reproducibility; and the relay's TCP flow key.
import { describe, expect, it } from 'vitest';
import { LinkDirection, type LinkParams } from '../../src/lab/link.js';
import { tcpFlowKey } from '../../src/lab/relay.js';
import { PROFILES, parseMs, parseProbability, parseRate } from '../../src/lab/profiles.js';

const base: LinkParams = { rateBps: 10e6, delayMs: 50, jitterMs: 0, loss: 0, ge: null, reorder: 0, queueBytes: 1e9 };

describe('LinkDirection', () => {
  it('serializes at the link rate and adds the one-way delay', () => {
    const d = new LinkDirection({ ...base }, 1);
    // 1250-byte packets on 10 Mbit/s take 1 ms each.
    const t = [0, 0, 0].map(() => d.admit(0, 1250) as number);
    expect(t).toEqual([51, 52, 53]);
    expect(d.admit(10, 1250)).toBe(61);
  });

  it('drops at the tail when the queue is full, and counts it', () => {
    const d = new LinkDirection({ ...base, queueBytes: 5000 }, 1);
    const r = Array.from({ length: 10 }, () => d.admit(0, 1250));
    expect(r.filter((x) => x === 'queue')).toHaveLength(6);
    expect(d.counters.dropped.queue).toBe(6);
    expect(d.counters.deliveredPackets).toBe(4);
    // After the line drains, packets are admitted again.
    expect(typeof d.admit(100, 1250)).toBe('number');
  });

  it('loses about the configured fraction, i.i.d.', () => {
    const d = new LinkDirection({ ...base, rateBps: 0, loss: 0.01 }, 42);
    for (let i = 0; i < 200_000; i++) d.admit(i, 100);
    const frac = d.counters.dropped.loss / 200_000;
    expect(frac).toBeGreaterThan(0.0093);
    expect(frac).toBeLessThan(0.0107);
  });

  it('Gilbert–Elliott loss is bursty with the stationary rate the chain implies', () => {
    const ge = { pGoodBad: 0.01, pBadGood: 0.25, lossGood: 0, lossBad: 0.8 };
    const d = new LinkDirection({ ...base, rateBps: 0, ge }, 7);
    let runs = 0;
    let prevLost = false;
    const n = 400_000;
    for (let i = 0; i < n; i++) {
      const lost = d.admit(i, 100) === 'loss';
      if (lost && !prevLost) runs++;
      prevLost = lost;
    }
    const expected = (ge.pGoodBad / (ge.pGoodBad + ge.pBadGood)) * ge.lossBad; // ≈ 3.08 %
    const frac = d.counters.dropped.loss / n;
    expect(Math.abs(frac - expected) / expected).toBeLessThan(0.1);
    // Bursty: mean loss-run length well above the ~1.0 of i.i.d. loss at this rate.
    expect(d.counters.dropped.loss / runs).toBeGreaterThan(1.5);
  });

  it('keeps FIFO order under jitter, within ±jitter of the base delay', () => {
    const d = new LinkDirection({ ...base, rateBps: 0, jitterMs: 10 }, 3);
    let prev = -Infinity;
    for (let i = 0; i < 10_000; i++) {
      const at = d.admit(i * 0.1, 100) as number;
      expect(at).toBeGreaterThanOrEqual(prev);
      expect(at).toBeGreaterThanOrEqual(i * 0.1 + 40);
      prev = at;
    }
  });

  it('reorders only when asked', () => {
    const d = new LinkDirection({ ...base, rateBps: 0, reorder: 0.2 }, 3);
    const times = Array.from({ length: 2000 }, (_, i) => d.admit(i, 100) as number);
    const overtakes = times.filter((t, i) => i > 0 && t < Math.max(...times.slice(Math.max(0, i - 30), i))).length;
    expect(overtakes).toBeGreaterThan(100);
  });

  it('is reproducible from its seed', () => {
    const run = (seed: number) => {
      const d = new LinkDirection({ ...base, loss: 0.05, jitterMs: 5 }, seed);
      return Array.from({ length: 1000 }, (_, i) => d.admit(i, 500));
    };
    expect(run(9)).toEqual(run(9));
    expect(run(9)).not.toEqual(run(10));
  });

  it('counts forced drops and retractions', () => {
    const d = new LinkDirection({ ...base }, 1);
    expect(d.admit(0, 100, 'outage')).toBe('outage');
    expect(d.admit(0, 100, 'flow')).toBe('flow');
    d.admit(0, 100);
    d.retract(100);
    expect(d.counters).toMatchObject({ packets: 3, bytes: 300, deliveredPackets: 0, deliveredBytes: 0, dropped: { outage: 2, flow: 1 } });
  });
});

describe('tcpFlowKey', () => {
  function frame(proto: number, src: number, sport: number, dst: number, dport: number): Buffer {
    const b = Buffer.alloc(14 + 20 + 20);
    b.writeUInt16BE(0x0800, 12);
    b[14] = 0x45;
    b[14 + 9] = proto;
    b.writeUInt32BE(src, 14 + 12);
    b.writeUInt32BE(dst, 14 + 16);
    b.writeUInt16BE(sport, 34);
    b.writeUInt16BE(dport, 36);
    return b;
  }
  it('gives both directions of a TCP connection the same key, and nothing for UDP', () => {
    expect(tcpFlowKey(frame(6, 1, 1000, 2, 80))).toBe(tcpFlowKey(frame(6, 2, 80, 1, 1000)));
    expect(tcpFlowKey(frame(6, 1, 1001, 2, 80))).not.toBe(tcpFlowKey(frame(6, 1, 1000, 2, 80)));
    expect(tcpFlowKey(frame(17, 1, 1000, 2, 80))).toBeNull();
  });
});

describe('profiles and link settings', () => {
  it('defines the named profiles', () => {
    expect(PROFILES['wan-10']!.link).toMatchObject({ rateBps: 10e6, delayMs: 50, loss: 0.01 });
    expect(PROFILES['wan-100']!.link).toMatchObject({ rateBps: 100e6, delayMs: 25, loss: 0.001 });
    expect(PROFILES.lan!.link).toMatchObject({ rateBps: 1e9, delayMs: 0.25, loss: 0 });
    expect(PROFILES['wan-10-flap']!.outage).toMatchObject({ seconds: 20, flap: true });
  });
  it('parses operator input', () => {
    expect(parseRate('10mbit')).toBe(10e6);
    expect(parseRate('1gbit')).toBe(1e9);
    expect(parseMs('0.25ms')).toBe(0.25);
    expect(parseMs('2s')).toBe(2000);
    expect(parseProbability('1%')).toBe(0.01);
    expect(() => parseProbability('150%')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
    expect(() => parseRate('fast')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
  });
});
