// Why this file exists: `ferry setup` — the Debian packages Ferry needs on a host, checked with
// dpkg and installed with apt-get when running as root. Idempotent; prints what it does. When
// not root it names exactly what to install and fails with SETUP_REQUIRED.
import fs from 'node:fs';
import { FerryError } from '../errors.js';
import { run, runAllowFail } from '../util/exec.js';

/** Package → why Ferry needs it. */
export const REQUIRED_PACKAGES: Record<string, string> = {
  'qemu-system-x86': 'runs the VMs',
  'qemu-utils': 'qemu-img: creates and converts disk images',
  'busybox-static': "the guest image's userland",
  debootstrap: "the guest image's Debian root filesystem",
  cpio: 'packs the guest initramfs',
  e2fsprogs: 'mkfs.ext4 -d: the guest root disk',
  gcc: 'builds the in-guest workload tool',
  'libc6-dev': 'static libc for the in-guest workload tool',
  openssl: 'host identity certificates',
  iproute2: 'the WAN lab: network namespaces and veth',
  ethtool: 'the WAN lab: software checksums on the emulated link',
  'libnbd-bin': 'nbdinfo: NBD checks in tests',
};

export async function missingPackages(pkgs = Object.keys(REQUIRED_PACKAGES)): Promise<string[]> {
  const missing: string[] = [];
  for (const p of pkgs) {
    const r = await runAllowFail('dpkg-query', ['-W', '-f=${Status}', p]);
    if (r.code !== 0 || !r.stdout.includes('install ok installed')) missing.push(p);
  }
  return missing;
}

function aptListsEmpty(): boolean {
  try {
    return fs.readdirSync('/var/lib/apt/lists').filter((f) => f.includes('_Packages')).length === 0;
  } catch {
    return true;
  }
}

export async function setup(opts: { say?: (m: string) => void; checkOnly?: boolean } = {}): Promise<{ installed: string[] }> {
  const say = opts.say ?? (() => {});
  const missing = await missingPackages();
  if (missing.length === 0) {
    say(`all ${Object.keys(REQUIRED_PACKAGES).length} required Debian packages are installed`);
    // The guest image build resolves the kernel package through apt's lists.
    if (aptListsEmpty() && process.getuid?.() === 0 && !opts.checkOnly) {
      say('apt package lists are empty: apt-get update');
      await run('apt-get', ['update', '-q'], { timeoutMs: 600_000 });
    }
    return { installed: [] };
  }
  const cmd = `apt-get install -y --no-install-recommends ${missing.join(' ')}`;
  if (opts.checkOnly || process.getuid?.() !== 0) {
    throw new FerryError('SETUP_REQUIRED', `missing Debian packages: ${missing.join(', ')}\nas root, run: apt-get update && ${cmd}`, {
      details: { missing },
    });
  }
  say(`missing: ${missing.map((p) => `${p} (${REQUIRED_PACKAGES[p]})`).join(', ')}`);
  say('running: apt-get update');
  await run('apt-get', ['update', '-q'], { timeoutMs: 600_000, inherit: false });
  say(`running: ${cmd}`);
  await run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...missing], {
    timeoutMs: 1_200_000,
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
  const still = await missingPackages(missing);
  if (still.length) throw new FerryError('COMMAND_FAILED', `apt-get finished but these are still missing: ${still.join(', ')}`);
  say(`installed ${missing.length} package(s)`);
  return { installed: missing };
}
