// Folding guest console lines into the measurements: heartbeat gaps (host clock), durable seq.
import { describe, expect, it } from 'vitest';
import { emptyStats, foldLine } from '../../src/qemu/serial.js';

describe('guest console stats', () => {
  it('measures the largest gap between heartbeats on the host clock', () => {
    const s = emptyStats();
    foldLine(s, 'FERRY-HB 1', 1000);
    foldLine(s, 'FERRY-HB 2', 1100);
    foldLine(s, 'FERRY-HB 3', 1750); // a 650 ms pause
    foldLine(s, 'FERRY-HB 4', 1850);
    expect(s).toMatchObject({ heartbeats: 4, lastHeartbeat: 4, maxGapMs: 650, maxGapAt: 1750 });
  });
  it('keeps the highest durable sequence number, and notes readiness and the root disk', () => {
    const s = emptyStats();
    foldLine(s, 'FERRY-DURABLE 7', 0);
    foldLine(s, 'FERRY-DURABLE 5', 0);
    foldLine(s, 'FERRY-ROOT mounted /dev/vda debian=12.15', 0);
    foldLine(s, 'FERRY-READY uptime=2.8', 0);
    expect(s).toMatchObject({ lastDurableSeq: 7, ready: true, rootLine: 'FERRY-ROOT mounted /dev/vda debian=12.15' });
  });
  it('ignores unrelated lines', () => {
    const s = emptyStats();
    foldLine(s, '[    0.1] Linux version 6.1', 0);
    expect(s).toEqual(emptyStats());
  });
});
