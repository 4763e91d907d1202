// Why this file exists: FERRY_PROFILE=DIR (a debugging aid, off by default) records a CPU profile
// of this agent's main thread over a stretch of work, e.g. a migration's switchover, to see where
// a pause's milliseconds go. The profile (Chrome's .cpuprofile format) opens in Chrome DevTools;
// `mark` stamps the moment on the profile's own clock (µs, as its samples carry).
import fs from 'node:fs';
import inspector from 'node:inspector';
import path from 'node:path';

const DIR = process.env.FERRY_PROFILE;

export interface Profile {
  /** the profile clock now (µs), to find a moment among the samples */
  mark(name: string): void;
  stop(tag: string): void;
}

/** Starts a profile when FERRY_PROFILE is set; otherwise a no-op. */
export function startProfile(): Profile {
  if (!DIR) return { mark: () => {}, stop: () => {} };
  const s = new inspector.Session();
  s.connect();
  const marks: Record<string, number> = {};
  s.post('Profiler.enable', () => s.post('Profiler.setSamplingInterval', { interval: 100 }, () => s.post('Profiler.start')));
  return {
    mark: (name) => (marks[name] = Number(process.hrtime.bigint() / 1000n)),
    stop: (tag) =>
      s.post('Profiler.stop', (err, r) => {
        if (!err) fs.writeFileSync(path.join(DIR, `${tag}-${process.pid}-${Date.now()}.cpuprofile`), JSON.stringify({ ...r.profile, marks }));
        s.disconnect();
      }),
  };
}
