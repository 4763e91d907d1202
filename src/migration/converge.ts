// Why this file exists: the one convergence controller. From measured rates — the link's drain
// rate, the compression the transport achieves on disk blocks and on RAM pages, how fast the
// guest dirties disk and RAM — it decides together: whether to slow the guest's disk writes
// (block_set_io_throttle) and by how much, when to start the RAM phase, what QEMU may spend on
// the final RAM copy (downtime-limit), and when to let QEMU throttle the guest's CPU
// (auto-converge's trigger). It also predicts the pause. How fast QEMU pushes is not decided
// here: the RAM stream is paced by backpressure (ram-pipe.ts, queueTarget below).
// Pure: unit-tested with made-up rates (test/unit/migration-parts.test.ts).

export interface ConvergeInput {
  /** wire bytes/s the link drained at its best (measured during the bulk copy) */
  linkBytesPerSec: number;
  rttMs: number;
  maxDowntimeMs: number;
  /** raw/wire ratios the transport achieved (≥ 1) */
  diskRatio: number;
  ramRatio: number;
  /** guest disk dirty rate, raw bytes/s, and what the last round left to send */
  diskDirtyRate: number;
  diskLastDirtyBytes: number;
  /** dirty rounds done after round 0 */
  rounds: number;
  /** the transport's queue QEMU is paced to (converge.queueTarget), bytes */
  queueBytes?: number;
  /** wire bytes/s the link drains now (absent while it is down) */
  drainNowBytesPerSec?: number;
  /** RAM phase figures, once it runs */
  ram?: { remaining: number; dirtyBytesPerSec: number; secondsInRam: number };
}

export interface ConvergeDecision {
  /** guest write cap in bytes/s (0 = none) */
  ioThrottleBps: number;
  startRam: boolean;
  /** QEMU migrate parameters */
  downtimeLimitMs: number;
  throttleTrigger: number;
  predictedDowntimeMs: number;
  note: string;
}

/**
 * What the destination spends in the pause beyond receiving bytes: QEMU loading the last pages
 * and device state, the guest-RAM comparison (ram-verify.ts; ~50 ms for 256 MiB here), `cont`.
 */
const DEST_MS = 70;
export function decide(i: ConvergeInput): ConvergeDecision {
  const link = Math.max(i.linkBytesPerSec, 16 * 1024);
  const diskDrain = link * Math.max(1, i.diskRatio);
  const ramDrain = link * Math.max(1, i.ramRatio);
  // The final disk delta is what the guest dirties during one round (~ RTT + the round's send).
  const roundSec = Math.max(i.rttMs / 1000, i.diskLastDirtyBytes / diskDrain) + 0.05;
  const finalDisk = i.diskDirtyRate * roundSec;
  const finalDiskMs = (finalDisk / diskDrain) * 1000;

  // Disk: rounds converge if the guest dirties clearly less than the link drains. Otherwise cap
  // the guest's writes at a third of the drain rate — enough to keep it working, little enough
  // that each round shrinks.
  let ioThrottleBps = 0;
  let note = '';
  // Only when rounds really pile up (the last left over a second of work and 4 MiB): a short
  // bulk copy may never have measured the link at full speed, and a rate compared with an
  // underestimated drain would throttle a guest that converges anyway (seen in the demo).
  if (i.rounds >= 2 && i.diskDirtyRate > 0.5 * diskDrain && i.diskLastDirtyBytes > Math.max(4 << 20, diskDrain)) {
    ioThrottleBps = Math.max(64 * 1024, Math.round(diskDrain / 3));
    note = `guest disk writes throttled to ${Math.round(ioThrottleBps / 1024)} KiB/s (dirtying ${Math.round(i.diskDirtyRate / 1024)} KiB/s, link drains ${Math.round(diskDrain / 1024)} KiB/s)`;
  }
  const startRam = i.rounds >= 1 && (i.diskLastDirtyBytes / diskDrain) * 1000 <= Math.max(1000, i.maxDowntimeMs);

  // RAM: the pause is the queue still to cross (beyond what is already in flight), QEMU's last
  // pages and device state at the link's rate, one one-way trip, and the destination's work.
  // What is left of the operator's limit after the rest is the link time the last pages get.
  const bdp = (link * i.rttMs) / 1000;
  const queueMs = (Math.max(0, (i.queueBytes ?? 0) - bdp) / link) * 1000;
  const budget = Math.max(20, i.maxDowntimeMs - i.rttMs / 2 - queueMs - finalDiskMs - DEST_MS);
  // QEMU measures its own rate and predicts the switchover's copy from it. During the RAM copy
  // that rate is what the paced queue lets through (a queue short enough to keep the pause short
  // leaves the link part idle; measured on wan-10: 3.6 Mbit/s of 10), but in the pause the last
  // pages go at the link's full rate. So QEMU's limit is the budget scaled by how far below the
  // link its stream runs (at most 4×; not while the link is down).
  const underuse = i.drainNowBytesPerSec ? Math.min(4, Math.max(1, link / i.drainNowBytesPerSec)) : 1;
  // auto-converge's trigger: only once RAM has failed to converge for a while does QEMU get to
  // slow the guest's CPU (100 = only when dirtying outpaces sending; lower = sooner).
  const secs = i.ram?.secondsInRam ?? 0;
  const throttleTrigger = secs < 30 ? 100 : secs < 90 ? 70 : 50;
  // A guest that still dirties RAM faster than QEMU sends it once its CPU is throttled (from 30 s)
  // would otherwise run into --timeout: from 60 s QEMU's limit doubles every 10 s, up to 8×
  // (Proxmox raises its downtime limit the same way). QEMU predicts from the rate it reaches
  // while the guest runs, which under TCG on a busy host is far below what it reaches once the
  // guest is paused (measured on wan-10: ~20 MB/s of pages while running, 125 MB/s in the pause),
  // so the real pause stays well below the raised limit. Measured in the wan-10 RAM-outage test
  // (128 MiB guest rewriting 8 MiB): without this, 160 s at 99 % CPU throttling.
  const relax = secs < 60 ? 1 : Math.min(8, 2 ** Math.floor((secs - 50) / 10));
  const downtimeLimitMs = Math.round(budget * underuse * relax);
  const ramFinal = i.ram ? Math.min(i.ram.remaining, i.ram.dirtyBytesPerSec * (budget / 1000) + 64 * 1024) : 0;
  const predictedDowntimeMs = Math.round(i.rttMs / 2 + queueMs + finalDiskMs + (ramFinal / ramDrain) * 1000 + DEST_MS);
  if (!note && relax > 1) note = `RAM not converging after ${Math.round(secs)} s, CPU throttled: QEMU's pause limit raised ${relax}×`;
  else if (!note && secs >= 30) note = `RAM not converging after ${Math.round(secs)} s: CPU throttling allowed (trigger ${throttleTrigger} %)`;
  return { ioThrottleBps, startRam, downtimeLimitMs, throttleTrigger, predictedDowntimeMs, note };
}

/**
 * QEMU's max-bandwidth. The RAM stream is paced by backpressure (ram-pipe.ts), not by a rate, so
 * while the link drains QEMU may push as fast as the agent reads. Only while the link is down is
 * QEMU held to a trickle (the agent then spools instead of blocking QEMU's thread).
 *
 * History, measured on wan-10: pacing max-bandwidth against the queue (×1.25 when it was short,
 * ×0.75 when long, every 250 ms) oscillated, because a raw byte rate means nothing when pages
 * compress 1:1 in one region and 250:1 in the next (the guest's dirtied pages: 8 random bytes
 * each). The link sat at 1–3 Mbit/s for seconds at a time during the RAM copy, and half a
 * 1 MiB window had to stay queued to keep it busy at all — 400 ms that every switchover paid.
 */
export const RAM_RATE_OPEN = 2 ** 30;
export const RAM_RATE_LINK_DOWN = 256 * 1024;

/**
 * The queue backpressure keeps (transport unacknowledged + spool). During QEMU's first pass over
 * RAM (the bulk of the stream's wire bytes) it is half the transport window: with 1 % loss spread
 * over 16 connections the link needs that much to stay full (measured on wan-10: a 256 KiB queue
 * held it at 6 Mbit/s of 10). After the first pass QEMU resends what the guest dirtied, which is
 * little on the wire, and the switchover can come at any iteration; what is queued then crosses
 * during the pause. So the target drops to one bandwidth-delay product — what is in flight anyway
 * — at least 128 KiB, and at least 50 ms of the link (the event loop's jitter on fast links).
 * That leaves the link partly idle between switchovers; `decide` tells QEMU so (its limit).
 * Measured on wan-10: two BDPs after the first pass, 504 ms pause; one BDP, 309 ms.
 */
export function queueTarget(o: { drainBytesPerSec: number; rttMs: number; window: number; firstPass: boolean }): number {
  const tail = Math.max(128 * 1024, (o.drainBytesPerSec * o.rttMs) / 1000, 0.05 * o.drainBytesPerSec);
  return Math.round(o.firstPass ? Math.max(tail, 0.5 * o.window) : tail);
}
