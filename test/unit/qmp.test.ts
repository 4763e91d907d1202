// QMP client against a scripted fake QEMU (unix socket): replies by id (out of order), errors,
// events, timeouts, and a disconnect with commands in flight.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../../src/qemu/qmp.js';

type Script = (cmd: { execute: string; id: string; arguments?: unknown }, sock: net.Socket) => void;

const servers: net.Server[] = [];
afterEach(() => servers.splice(0).forEach((s) => s.close()));

function fakeQemu(script: Script): Promise<{ path: string; sockets: net.Socket[] }> {
  const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'qmp-')), 'qmp.sock');
  const sockets: net.Socket[] = [];
  const srv = net.createServer((s) => {
    sockets.push(s);
    s.write(JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } }) + '\r\n');
    let buf = '';
    s.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities') s.write(JSON.stringify({ return: {}, id: cmd.id }) + '\r\n');
        else script(cmd, s);
      }
    });
  });
  servers.push(srv);
  return new Promise((resolve) => srv.listen(p, () => resolve({ path: p, sockets })));
}

describe('QmpClient', () => {
  it('correlates replies by id even when they arrive out of order', async () => {
    const held: { id: string; execute: string }[] = [];
    const f = await fakeQemu((cmd, s) => {
      held.push(cmd);
      if (held.length === 2) for (const c of held.reverse()) s.write(JSON.stringify({ return: { echo: c.execute }, id: c.id }) + '\n');
    });
    const q = await QmpClient.connect(f.path);
    expect(q.greeting).toMatchObject({ version: { qemu: { major: 7 } } });
    const [a, b] = await Promise.all([q.execute('query-status'), q.execute('query-name')]);
    expect(a).toEqual({ echo: 'query-status' });
    expect(b).toEqual({ echo: 'query-name' });
    q.close();
  });

  it('turns a QMP error into QMP_ERROR with the class and description', async () => {
    const f = await fakeQemu((cmd, s) => s.write(JSON.stringify({ error: { class: 'DeviceNotFound', desc: 'no disk9' }, id: cmd.id }) + '\n'));
    const q = await QmpClient.connect(f.path);
    await expect(q.execute('blockdev-del', { 'node-name': 'disk9' })).rejects.toMatchObject({
      code: 'QMP_ERROR',
      message: 'blockdev-del: no disk9',
      details: { class: 'DeviceNotFound' },
    });
    q.close();
  });

  it('delivers events, including to waitEvent with a predicate', async () => {
    const f = await fakeQemu((cmd, s) => {
      s.write(JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { id: 'j', status: 'running' }, timestamp: { seconds: 1, microseconds: 2 } }) + '\n');
      s.write(JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { id: 'j', status: 'ready' }, timestamp: { seconds: 1, microseconds: 3 } }) + '\n');
      s.write(JSON.stringify({ return: {}, id: cmd.id }) + '\n');
    });
    const q = await QmpClient.connect(f.path);
    const seen: string[] = [];
    q.on('event', (e) => seen.push(`${e.event}:${e.data.status}`));
    const ready = q.waitEvent('JOB_STATUS_CHANGE', 2000, (d) => d.status === 'ready');
    await q.execute('job-start');
    expect((await ready).data.status).toBe('ready');
    expect(seen).toEqual(['JOB_STATUS_CHANGE:running', 'JOB_STATUS_CHANGE:ready']);
    q.close();
  });

  it('times out a command QEMU never answers, and keeps working afterwards', async () => {
    const f = await fakeQemu((cmd, s) => {
      if (cmd.execute !== 'hang') s.write(JSON.stringify({ return: 42, id: cmd.id }) + '\n');
    });
    const q = await QmpClient.connect(f.path);
    await expect(q.execute('hang', undefined, 100)).rejects.toMatchObject({ code: 'QMP_TIMEOUT' });
    expect(await q.execute('ok')).toBe(42);
    q.close();
  });

  it('rejects every pending command with QMP_DISCONNECTED when the socket closes', async () => {
    const f = await fakeQemu(() => {});
    const q = await QmpClient.connect(f.path);
    const closed = new Promise((r) => q.once('close', r));
    const p1 = q.execute('a');
    const p2 = q.execute('b');
    f.sockets[0]!.destroy();
    await expect(p1).rejects.toMatchObject({ code: 'QMP_DISCONNECTED' });
    await expect(p2).rejects.toMatchObject({ code: 'QMP_DISCONNECTED' });
    await closed;
    await expect(q.execute('c')).rejects.toMatchObject({ code: 'QMP_DISCONNECTED' });
  });

  it('fails to connect with QMP_DISCONNECTED when nothing listens', async () => {
    await expect(QmpClient.connect('/nonexistent/qmp.sock', { connectTimeoutMs: 200 })).rejects.toMatchObject({ code: 'QMP_DISCONNECTED' });
  });
});
