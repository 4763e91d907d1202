// Why this file exists: the one convergence controller. From measured rates — the link's drain
// rate, the compression the transport achieves on disk blocks and on RAM pages, how fast the
// guest dirties disk and RAM — it decides together: whether to slow the guest's disk writes
// (block_set_io_throttle) and by how much, when to start the RAM phase, what QEMU may spend on
// the final RAM copy (downtime-limit) and how fast QEMU may push (max-bandwidth: just under what
// the link drains, so no RAM queues in the agent and QEMU's own estimate is true), and when to
// let QEMU throttle the guest's CPU (auto-converge's trigger). It also predicts the pause.
// Pure: unit-tested with made-up rates (test/unit/converge.test.ts).

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
  /** RAM phase figures, once it runs */
  ram?: { remaining: number; dirtyBytesPerSec: number; secondsInRam: number };
}

export interface ConvergeDecision {
  /** guest write cap in bytes/s (0 = none) */
  ioThrottleBps: number;
  startRam: boolean;
  /** QEMU migrate parameters */
  downtimeLimitMs: number;
  maxBandwidth: number;
  throttleTrigger: number;
  predictedDowntimeMs: number;
  note: string;
}

/** fixed cost of a switchover beyond moving bytes: device state, load, cont, heartbeat */
const FIXED_MS = 80;

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

  // RAM: the pause budget left after the link's round trip (the final data's one-way trip and
  // the destination's answer race it), the disk delta and the fixed cost.
  const budget = i.maxDowntimeMs - i.rttMs - finalDiskMs - FIXED_MS;
  const downtimeLimitMs = Math.max(20, Math.round(budget));
  const maxBandwidth = Math.max(256 * 1024, Math.round(0.9 * ramDrain));
  // auto-converge's trigger: only once RAM has failed to converge for a while does QEMU get to
  // slow the guest's CPU (100 = only when dirtying outpaces sending; lower = sooner).
  const secs = i.ram?.secondsInRam ?? 0;
  const throttleTrigger = secs < 30 ? 100 : secs < 90 ? 70 : 50;
  const ramFinal = i.ram ? Math.min(i.ram.remaining, i.ram.dirtyBytesPerSec * (downtimeLimitMs / 1000) + 64 * 1024) : 0;
  const predictedDowntimeMs = Math.round(i.rttMs / 2 + finalDiskMs + (ramFinal / ramDrain) * 1000 + FIXED_MS);
  if (!note && secs >= 30) note = `RAM not converging after ${Math.round(secs)} s: CPU throttling allowed (trigger ${throttleTrigger} %)`;
  return { ioThrottleBps, startRam, downtimeLimitMs, maxBandwidth, throttleTrigger, predictedDowntimeMs, note };
}

/**
 * QEMU's max-bandwidth, paced by the transport's queue: QEMU may push faster while the queue is
 * short of its target, slower when it is past it. This finds the link's real drain rate (for RAM
 * pages after compression, which no fixed estimate knows) and keeps the agent's queue short, so
 * what QEMU counts as sent has really left and the final pause holds only the final pages.
 */
export function paceRam(current: number, queueBytes: number, targetBytes: number): number {
  const next = queueBytes < 0.5 * targetBytes ? current * 1.25 : queueBytes > 1.5 * targetBytes ? current * 0.75 : current;
  return Math.round(Math.min(4 * 2 ** 30, Math.max(256 * 1024, next)));
}

/**
 * The queue the pacing aims at: half the transport window. Measured on wan-10: a target of two
 * bandwidth-delay products (256 KiB floor) left the link 50 % idle during the RAM copy (185 s
 * instead of 143 s) and the guest converged only under CPU throttling; one BDP with a 64 KiB
 * floor never converged at all. What is queued when QEMU pauses the guest adds to the pause
 * (half a 1 MiB window is 400 ms at 10 Mbit/s). Dropping the target to one BDP only near the
 * switchover (QEMU's remaining RAM within 4× what it may send in its downtime limit) cut the
 * wan-10 pause from 687 to 437 ms in one run, but a 128 MiB guest rewriting 8 MiB then did not
 * converge within 300 s: reverted until a controller handles both (issue 5 notes).
 */
export function queueTarget(o: { window: number; drainBytesPerSec: number; rttMs: number }): number {
  return 0.5 * o.window;
}
