// Bad input through the real API and CLI: each gets its stable code and exit status, and
// nothing changes (no VM, no files, no process).
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestAgent } from './harness.js';

let agent: TestAgent;
beforeAll(async () => {
  agent = await TestAgent.create();
  expect(agent.cli(['vm', 'create', 'exists', '--disk', '16M']).code).toBe(0);
});
afterAll(async () => {
  await agent?.destroy();
});

function snapshot() {
  return {
    vms: agent.cli(['--json', 'vm', 'list']).stdout,
    dirs: fs.readdirSync(path.join(agent.dataDir, 'vms')).sort(),
  };
}

describe('bad input changes nothing', () => {
  const cases: [string, string[], string, number][] = [
    ['invalid name', ['vm', 'create', 'Bad_Name'], 'INVALID_NAME', 2],
    ['name too long', ['vm', 'create', 'a'.repeat(64)], 'INVALID_NAME', 2],
    ['duplicate', ['vm', 'create', 'exists'], 'VM_EXISTS', 5],
    ['unknown VM', ['vm', 'start', 'nope'], 'VM_NOT_FOUND', 3],
    ['unknown VM delete', ['vm', 'delete', 'nope'], 'VM_NOT_FOUND', 3],
    ['memory too small', ['vm', 'create', 'm1', '--memory', '1M'], 'SIZE_OUT_OF_RANGE', 2],
    ['too many vcpus', ['vm', 'create', 'c1', '--vcpus', '1000'], 'SIZE_OUT_OF_RANGE', 2],
    ['disk too small', ['vm', 'create', 'd1', '--disk', '1K'], 'SIZE_OUT_OF_RANGE', 2],
    ['unparseable size', ['vm', 'create', 'd2', '--memory', 'lots'], 'INVALID_ARGUMENT', 2],
    ['path outside data dir', ['vm', 'create', 'p1', '--disk', '/etc/passwd'], 'PATH_OUTSIDE_DATA_DIR', 2],
    ['path escaping data dir', ['vm', 'create', 'p2', '--disk', '../../etc/passwd'], 'PATH_OUTSIDE_DATA_DIR', 2],
    ['unknown image', ['vm', 'create', 'i1', '--image', 'no-such-image'], 'IMAGE_NOT_FOUND', 3],
    ['stop a stopped VM', ['vm', 'stop', 'exists'], 'VM_NOT_RUNNING', 5],
    ['pause a stopped VM', ['vm', 'pause', 'exists'], 'VM_NOT_RUNNING', 5],
    ['wrong token', ['--token', 'wrong', 'vm', 'list'], 'UNAUTHENTICATED', 4],
    ['unreachable agent', ['--host', 'http://127.0.0.1:9', 'vm', 'list'], 'AGENT_UNREACHABLE', 7],
  ];
  for (const [what, args, code, exit] of cases) {
    it(`${what} → ${code}`, () => {
      const before = snapshot();
      const r = agent.cli(args);
      expect(r.stderr).toContain(`error [${code}]`);
      expect(r.code).toBe(exit);
      expect(snapshot()).toEqual(before);
    });
  }

  it('--json errors are machine-readable', () => {
    const r = agent.cli(['--json', 'vm', 'show', 'nope']);
    expect(JSON.parse(r.stderr)).toEqual({ error: { code: 'VM_NOT_FOUND', message: 'no VM named "nope" on this host' } });
  });

  it('the API refuses a missing token, bad JSON and unknown fields', async () => {
    const port = agent.port;
    const noTok = await fetch(`http://127.0.0.1:${port}/v1/vms`);
    expect(noTok.status).toBe(401);
    expect(await noTok.json()).toMatchObject({ code: 'UNAUTHENTICATED' });
    const token = fs.readFileSync(path.join(agent.dataDir, 'api-token'), 'utf8').trim();
    const h = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
    const badJson = await fetch(`http://127.0.0.1:${port}/v1/vms`, { method: 'POST', headers: h, body: '{nope' });
    expect(badJson.status).toBe(400);
    expect(await badJson.json()).toMatchObject({ code: 'INVALID_ARGUMENT' });
    const badField = await fetch(`http://127.0.0.1:${port}/v1/vms`, { method: 'POST', headers: h, body: JSON.stringify({ name: 'w', image: 'ferry-guest', workload: { bogus: 1 } }) });
    expect(await badField.json()).toMatchObject({ code: 'INVALID_ARGUMENT' });
    const route = await fetch(`http://127.0.0.1:${port}/v1/nothing`, { headers: h });
    expect(route.status).toBe(404);
  });

  it('deleting a running VM without --force is refused and it keeps running', async () => {
    expect(agent.cli(['vm', 'create', 'runner', '--disk', '16M', '--start']).code).toBe(0);
    const r = agent.cli(['vm', 'delete', 'runner']);
    expect(r.code).toBe(5);
    expect(r.stderr).toContain('VM_RUNNING');
    expect(JSON.parse(agent.cli(['--json', 'vm', 'show', 'runner']).stdout).state).toBe('running');
    const again = agent.cli(['vm', 'start', 'runner']);
    expect(again.stderr).toContain('VM_RUNNING');
    expect(agent.cli(['vm', 'delete', 'runner', '--force']).code).toBe(0);
  });
});
