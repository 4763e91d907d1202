// Why this file exists: the probe's process entry point (probe.ts says what it measures):
//   node dist/lab/probe-main.js server
//   node dist/lab/probe-main.js rtt|loss|rate|tcp TO_IP [JSON options]   → one JSON line
import { blast, rtt, server, tcp } from './probe.js';

const [mode, to, opts] = process.argv.slice(2);
const o = opts ? (JSON.parse(opts) as Record<string, number>) : {};
const out = (v: unknown) => process.stdout.write(JSON.stringify(v) + '\n');
switch (mode) {
  case 'server':
    server();
    break;
  case 'rtt':
    out(await rtt(to!, o.count, o.intervalMs));
    break;
  case 'loss':
    out(await blast(to!, { count: o.count ?? 5000, pps: o.pps ?? 1000, size: 200 }));
    break;
  case 'rate':
    out(await blast(to!, { seconds: o.seconds ?? 5, bps: o.bps, size: 1200 }));
    break;
  case 'tcp':
    out(await tcp(to!, o.seconds));
    break;
  default:
    process.stderr.write('usage: probe-main.js server | rtt|loss|rate|tcp TO_IP [JSON]\n');
    process.exit(2);
}
