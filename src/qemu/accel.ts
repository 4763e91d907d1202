// Why this file exists: KVM must be used where it works and never assumed. On some hosts
// /dev/kvm exists and even runs trivial real-mode code, yet a Linux guest hangs before printing
// anything (seen on Ferry's CI machines). So the probe boots a real kernel under KVM and waits
// for its banner on the serial port; no banner within the limit means TCG. The verdict is cached
// per host boot (kernel boot_id) and QEMU binary in /run/ferry, because probing costs seconds.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export type Accel = 'kvm' | 'tcg';

export interface AccelInfo {
  accel: Accel;
  reason: string;
}

export const QEMU_BIN = process.env.FERRY_QEMU ?? 'qemu-system-x86_64';
const CACHE_DIR = process.env.FERRY_RUN_DIR ?? '/run/ferry';

function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/** Boots `kernel` under KVM; true if the kernel banner appears within `timeoutMs`. */
function kvmBootsKernel(kernel: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const child = spawn(
      QEMU_BIN,
      ['-accel', 'kvm', '-machine', 'pc', '-m', '128', '-smp', '1', '-display', 'none', '-nodefaults', '-no-user-config',
        '-no-reboot', '-kernel', kernel, '-append', 'console=ttyS0 panic=-1', '-serial', 'stdio'],
      { stdio: ['ignore', 'pipe', 'ignore'] },
    );
    let out = '';
    let done = false;
    const finish = (ok: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes('Linux version')) finish(true);
    });
    child.on('error', () => finish(false));
    child.on('exit', () => finish(out.includes('Linux version')));
  });
}

/**
 * Decides KVM or TCG. `probeKernel` is a bootable kernel (the guest image's); without one KVM
 * cannot be verified and TCG is chosen. FERRY_ACCEL=kvm|tcg overrides the probe.
 */
export async function detectAccel(probeKernel: string | undefined): Promise<AccelInfo> {
  const forced = process.env.FERRY_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return { accel: forced, reason: 'forced by FERRY_ACCEL' };
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is absent or not accessible' };
  }
  if (!probeKernel || !fs.existsSync(probeKernel)) {
    return { accel: 'tcg', reason: '/dev/kvm exists but no kernel is available to verify it (build the guest image)' };
  }
  const key = `${bootId()}|${QEMU_BIN}|${probeKernel}`;
  const cacheFile = path.join(CACHE_DIR, 'accel.json');
  try {
    const cached = JSON.parse(fs.readFileSync(cacheFile, 'utf8')) as AccelInfo & { key: string };
    if (cached.key === key) return { accel: cached.accel, reason: `${cached.reason} (cached for this boot)` };
  } catch {
    /* no cache yet */
  }
  const ok = await kvmBootsKernel(probeKernel, 8000);
  const info: AccelInfo = ok
    ? { accel: 'kvm', reason: 'a test kernel booted under KVM' }
    : { accel: 'tcg', reason: '/dev/kvm exists but a test kernel did not boot under KVM within 8 s' };
  try {
    fs.mkdirSync(CACHE_DIR, { recursive: true });
    fs.writeFileSync(cacheFile, JSON.stringify({ ...info, key }));
  } catch {
    /* cache is best effort */
  }
  return info;
}
