// The guest image is cached (a second build is a no-op), and `ferry setup --check` passes on a
// host that ran setup. The image itself was built from nothing by ./run-tests before this runs.
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { cliJs, guestImage } from './harness.js';

const ferry = (args: string[]) => spawnSync(process.execPath, [cliJs, ...args], { encoding: 'utf8', timeout: 600_000 });

describe('guest image and setup', () => {
  it('rebuilds nothing when its inputs are unchanged', () => {
    const before = guestImage().manifest;
    const r = ferry(['--json', 'image', 'build-guest']);
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.rebuilt).toBe(false);
    expect(out.manifest.inputsHash).toBe(before.inputsHash);
  });

  it('lists the image with its Debian kernel package', () => {
    const r = ferry(['--json', 'image', 'list']);
    const list = JSON.parse(r.stdout) as { name: string; kernelPackage: string }[];
    expect(list.find((i) => i.name === 'ferry-guest')?.kernelPackage).toMatch(/^linux-image-.*-cloud-amd64=/);
  });

  it('setup --check finds every required package', () => {
    const r = ferry(['setup', '--check']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });
});
