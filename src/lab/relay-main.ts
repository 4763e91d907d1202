// Why this file exists: the relay's process entry point, `node dist/lab/relay-main.js CONFIG`,
// started by `ferry lab up` inside the lab's wan namespace (see relay.ts for what it does).
import fs from 'node:fs';
import { Relay, type RelayConfig } from './relay.js';

const cfg = JSON.parse(fs.readFileSync(process.argv[2]!, 'utf8')) as RelayConfig;
const relay = new Relay(cfg);
relay
  .start()
  .then(() => process.stdout.write(`relay up: ${cfg.hosts.length} hosts, seed ${cfg.seed}, control ${cfg.control}\n`))
  .catch((e) => {
    process.stderr.write(`relay failed: ${(e as Error).stack}\n`);
    process.exit(1);
  });
process.on('SIGTERM', () => process.exit(0));
