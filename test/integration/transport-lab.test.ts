// Ferry's transport across the WAN lab (wan-10, mutual TLS with pinned certificates): data
// arrives identical (SHA-256) through a plain outage and through a flap that kills every TCP
// flow; the number of frames sent twice stays bounded.
import { describe, expect, it } from 'vitest';
import { benchTransport } from '../../src/bench/transport.js';
import { guestImage } from './harness.js';

describe('transport over the WAN lab', () => {
  it('survives an outage and a flap with zero lost or duplicated bytes', async () => {
    guestImage();
    for (const cut of [
      { atSeconds: 3, seconds: 6, flap: false },
      { atSeconds: 3, seconds: 6, flap: true },
    ]) {
      const r = await benchTransport({ corpus: 'random', profile: 'wan-10', bytes: 8 << 20, streams: 8, cc: 'cubic', cut, timeoutSec: 240, modes: ['ferry'], say: (m) => console.log(m) });
      const run = r.runs[0]!;
      expect(run.error).toBeUndefined();
      expect(run.sha256Match).toBe(true);
      // A short outage is ridden out by TCP itself; a flap kills every flow, so every old
      // connection is declared dead and replaced (the session may or may not stall in between,
      // depending on whether a re-dialled connection arrives before the last old one dies).
      if (cut.flap) expect(run.events!.filter((e) => e.startsWith('lost')).length).toBeGreaterThanOrEqual(8);
      // Bounded resends: at most the window (≥ 2 MiB = 32 frames of 64 KiB) plus change.
      expect(run.resentFrames!).toBeLessThanOrEqual(48);
    }
  });
});
