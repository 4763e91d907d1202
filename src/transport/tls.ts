// Why this file exists: who a transport peer is. A host's identity is the key + self-signed
// certificate from `ferry agent init`; peers are pinned by the SHA-256 fingerprint of their
// certificate in the data dir's trust store (`ferry host trust NAME URL --fingerprint F`, like
// ssh's known_hosts). An unknown or mismatched certificate is refused.
import fs from 'node:fs';
import path from 'node:path';
import { files } from '../config.js';
import { FerryError } from '../errors.js';

export interface Identity {
  key: string;
  cert: string;
  trusted(fingerprint: string): boolean;
}

export interface TrustedHost {
  name: string;
  url: string;
  fingerprint: string;
  addedAt: string;
}

const FP_RE = /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/;

export function normalizeFingerprint(fp: string): string {
  const up = fp.trim().toUpperCase().replace(/^SHA256:/, '');
  const withColons = /^[0-9A-F]{64}$/.test(up) ? up.match(/../g)!.join(':') : up;
  if (!FP_RE.test(withColons)) throw new FerryError('INVALID_ARGUMENT', `not a SHA-256 certificate fingerprint: "${fp}"`);
  return withColons;
}

const trustFile = (dataDir: string) => path.join(dataDir, 'trusted-hosts.json');

export function readTrust(dataDir: string): TrustedHost[] {
  try {
    return JSON.parse(fs.readFileSync(trustFile(dataDir), 'utf8')) as TrustedHost[];
  } catch {
    return [];
  }
}

export function trustHost(dataDir: string, h: { name: string; url: string; fingerprint: string }): TrustedHost {
  if (!/^[a-z0-9][a-z0-9.-]{0,62}$/.test(h.name)) throw new FerryError('INVALID_NAME', `invalid host name "${h.name}"`);
  const entry: TrustedHost = { name: h.name, url: h.url, fingerprint: normalizeFingerprint(h.fingerprint), addedAt: new Date().toISOString() };
  const list = readTrust(dataDir).filter((x) => x.name !== h.name);
  list.push(entry);
  const f = trustFile(dataDir);
  fs.writeFileSync(`${f}.tmp`, JSON.stringify(list, null, 2) + '\n', { mode: 0o600 });
  fs.renameSync(`${f}.tmp`, f);
  return entry;
}

export function untrustHost(dataDir: string, name: string): void {
  const list = readTrust(dataDir);
  if (!list.some((x) => x.name === name)) throw new FerryError('INVALID_ARGUMENT', `no trusted host named "${name}"`);
  const f = trustFile(dataDir);
  fs.writeFileSync(`${f}.tmp`, JSON.stringify(list.filter((x) => x.name !== name), null, 2) + '\n', { mode: 0o600 });
  fs.renameSync(`${f}.tmp`, f);
}

/** The identity of the agent owning `dataDir`, trusting exactly its trust store (re-read on use). */
export function loadIdentity(dataDir: string): Identity {
  const f = files(dataDir);
  return {
    key: fs.readFileSync(f.key, 'utf8'),
    cert: fs.readFileSync(f.cert, 'utf8'),
    trusted: (fp) => readTrust(dataDir).some((x) => x.fingerprint === fp),
  };
}
