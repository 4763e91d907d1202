// Agent building blocks without QEMU: the router, the token check, the state DB, the error table.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Router, tokenMatches } from '../../src/agent/http.js';
import { StateDb } from '../../src/state/db.js';
import { ERROR_CODES } from '../../src/errors.js';
import { insideDataDir } from '../../src/config.js';

describe('router', () => {
  const r = new Router().add('GET', '/v1/vms/:name', () => 1).add('POST', '/v1/vms/:name/start', () => 2);
  it('matches method and path and decodes params', () => {
    expect(r.match('GET', '/v1/vms/web%2D1')?.params).toEqual({ name: 'web-1' });
    expect(r.match('POST', '/v1/vms/a/start')).toBeDefined();
    expect(r.match('POST', '/v1/vms/a')).toBeUndefined();
    expect(r.match('GET', '/v1/vms/a/b')).toBeUndefined();
  });
});

describe('token', () => {
  it('accepts only the exact bearer token', () => {
    expect(tokenMatches('s3cret', 'Bearer s3cret')).toBe(true);
    expect(tokenMatches('s3cret', 'Bearer s3cre')).toBe(false);
    expect(tokenMatches('s3cret', 's3cret')).toBe(false);
    expect(tokenMatches('s3cret', undefined)).toBe(false);
  });
});

describe('state db', () => {
  it('stores VMs, runtime state and events durably across reopen', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-db-'));
    const f = path.join(dir, 'state.db');
    const db = new StateDb(f);
    db.insertVm({ name: 'a', uuid: 'u1', vcpus: 1, memoryMiB: 64, disks: [], nics: [] }, { state: 'stopped' });
    db.setRuntime('a', { state: 'running', pid: 42, startedAt: 1 });
    db.addEvent('a', 'started', 'pid 42');
    db.close();
    const db2 = new StateDb(f);
    expect(db2.getVm('a')?.runtime).toEqual({ state: 'running', pid: 42, startedAt: 1 });
    expect(db2.events({ vm: 'a' }).map((e) => e.kind)).toEqual(['started']);
    expect(() => db2.insertVm({ name: 'a', uuid: 'u2', vcpus: 1, memoryMiB: 64, disks: [], nics: [] }, { state: 'stopped' })).toThrow();
    db2.close();
  });
});

describe('paths', () => {
  it('refuses paths outside the data dir', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dd-'));
    fs.writeFileSync(path.join(dir, 'x.qcow2'), '');
    expect(insideDataDir(dir, 'x.qcow2')).toBe(path.join(fs.realpathSync(dir), 'x.qcow2'));
    for (const p of ['/etc/passwd', '../x', dir, `${dir}/../etc`]) {
      expect(() => insideDataDir(dir, p)).toThrow(expect.objectContaining({ code: 'PATH_OUTSIDE_DATA_DIR' }));
    }
    fs.symlinkSync('/etc', path.join(dir, 'link'));
    expect(() => insideDataDir(dir, 'link/passwd')).toThrow(expect.objectContaining({ code: 'PATH_OUTSIDE_DATA_DIR' }));
  });
});

describe('docs/errors.md', () => {
  it('lists exactly the error codes the code defines', () => {
    const doc = fs.readFileSync(path.join(__dirname, '../../docs/errors.md'), 'utf8');
    const documented = [...doc.matchAll(/^\| `([A-Z_]+)` \|/gm)].map((m) => m[1]).sort();
    expect(documented).toEqual(Object.keys(ERROR_CODES).sort());
  });
});

describe('trust store', () => {
  it('pins peers by normalized SHA-256 fingerprint and refuses malformed ones', async () => {
    const { trustHost, readTrust, untrustHost, loadIdentity, normalizeFingerprint } = await import('../../src/transport/tls.js');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-trust-'));
    const fp = 'ab'.repeat(32);
    expect(normalizeFingerprint(fp)).toBe(Array(32).fill('AB').join(':'));
    trustHost(dir, { name: 'h2', url: 'http://10.0.0.2:7450', fingerprint: fp });
    expect(readTrust(dir).map((t) => t.fingerprint)).toEqual([Array(32).fill('AB').join(':')]);
    expect(() => trustHost(dir, { name: 'h3', url: 'x', fingerprint: 'nope' })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
    expect(() => trustHost(dir, { name: 'Bad Name', url: 'x', fingerprint: fp })).toThrow(expect.objectContaining({ code: 'INVALID_NAME' }));
    fs.writeFileSync(path.join(dir, 'host.key'), 'k');
    fs.writeFileSync(path.join(dir, 'host.crt'), 'c');
    expect(loadIdentity(dir).trusted(Array(32).fill('AB').join(':'))).toBe(true);
    untrustHost(dir, 'h2');
    expect(loadIdentity(dir).trusted(Array(32).fill('AB').join(':'))).toBe(false);
  });
});

describe('jobs', () => {
  it('report progress with a rate and an ETA, then a result or a coded error', async () => {
    const { Jobs } = await import('../../src/agent/jobs.js');
    const { FerryError } = await import('../../src/errors.js');
    const jobs = new Jobs();
    let report!: (p: string, d?: number, t?: number) => void;
    let finish!: () => void;
    const j = jobs.start('backup', 'vm1', (r) => {
      report = r;
      return new Promise<string>((res) => (finish = () => res('ok')));
    });
    report('reading', 0, 1000);
    await new Promise((r) => setTimeout(r, 300));
    report('reading', 500, 1000);
    expect(jobs.get(j.id).progress.bytesPerSec).toBeGreaterThan(0);
    expect(jobs.get(j.id).progress.etaSec).not.toBeNull();
    finish();
    await new Promise((r) => setTimeout(r, 10));
    expect(jobs.get(j.id)).toMatchObject({ state: 'done', result: 'ok' });
    const bad = jobs.start('restore', null, () => Promise.reject(new FerryError('STORE_FULL', 'full')));
    await new Promise((r) => setTimeout(r, 10));
    expect(jobs.get(bad.id)).toMatchObject({ state: 'failed', error: { code: 'STORE_FULL' } });
    expect(() => jobs.get('nope')).toThrow(expect.objectContaining({ code: 'NOT_FOUND' }));
  });
});

describe('snapshot bookkeeping', () => {
  it('keeps the tree and the current snapshot across a reopen of the database', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-snapdb-'));
    const file = path.join(dir, 'state.db');
    let db = new StateDb(file);
    const spec = { name: 'v', uuid: 'u', vcpus: 1, memoryMiB: 128, disks: [], nics: [] };
    db.insertVm(spec, { state: 'stopped' });
    db.tx(() => {
      db.putSnapshot({ vm: 'v', name: 'a', parent: null, createdAt: 1, status: 'ready', files: ['/x/a.qcow2'], stateFile: null, wasRunning: true, prevSpec: spec });
      db.setSnapshotCurrent('v', 'a');
    });
    db.close();
    db = new StateDb(file);
    expect(db.snapshots('v').map((s) => [s.name, s.parent, s.files])).toEqual([['a', null, ['/x/a.qcow2']]]);
    expect(db.snapshotCurrent('v')).toBe('a');
    db.deleteVm('v');
    expect(db.snapshots('v')).toEqual([]);
    db.close();
  });
});
