// Why this file exists: `ferry agent init` — a host's identity (an EC P-256 key and a
// self-signed certificate whose SHA-256 fingerprint peers pin, as ssh pins host keys) and the
// API token the CLI presents. Idempotent: an existing identity is kept, never overwritten.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { DEFAULT_IMAGES_DIR, DEFAULT_LISTEN, files, writeConfig, type AgentConfig } from '../config.js';
import { run } from '../util/exec.js';

export interface InitResult {
  dataDir: string;
  created: boolean;
  fingerprint: string;
  config: AgentConfig;
}

export function certFingerprint(certPem: string): string {
  return new crypto.X509Certificate(certPem).fingerprint256;
}

export async function initAgent(dataDir: string, opts: { listen?: string; imagesDir?: string; hostName?: string; transportListen?: string } = {}): Promise<InitResult> {
  const f = files(dataDir);
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  fs.mkdirSync(f.vms, { recursive: true, mode: 0o700 });
  fs.mkdirSync(f.run, { recursive: true, mode: 0o700 });
  const created = !fs.existsSync(f.config);
  const hostName = opts.hostName ?? os.hostname();
  if (!fs.existsSync(f.key) || !fs.existsSync(f.cert)) {
    await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '3650',
      '-subj', `/CN=${hostName}/O=ferry`, '-keyout', f.key, '-out', f.cert]);
    fs.chmodSync(f.key, 0o600);
  }
  if (!fs.existsSync(f.token)) {
    fs.writeFileSync(f.token, crypto.randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
  }
  let config: AgentConfig;
  if (created) {
    config = { listen: opts.listen ?? DEFAULT_LISTEN, imagesDir: opts.imagesDir ?? DEFAULT_IMAGES_DIR, hostName, ...(opts.transportListen ? { transportListen: opts.transportListen } : {}) };
    writeConfig(dataDir, config);
  } else {
    config = JSON.parse(fs.readFileSync(f.config, 'utf8')) as AgentConfig;
    const updated = { ...config, ...(opts.listen ? { listen: opts.listen } : {}), ...(opts.imagesDir ? { imagesDir: opts.imagesDir } : {}), ...(opts.transportListen ? { transportListen: opts.transportListen } : {}) };
    if (JSON.stringify(updated) !== JSON.stringify(config)) writeConfig(dataDir, (config = updated));
  }
  return { dataDir, created, fingerprint: certFingerprint(fs.readFileSync(f.cert, 'utf8')), config };
}

export function readToken(dataDir: string): string {
  return fs.readFileSync(files(dataDir).token, 'utf8').trim();
}
