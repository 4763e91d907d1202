// Why this file exists: `ferry image build-guest` — Ferry's test guest, built only from Debian
// packages, so that every test and benchmark boots the same thing on any fresh Debian 12 host:
//   vmlinuz     a Debian linux-image-*-cloud-amd64 kernel (apt-get download + dpkg -x)
//   initrd.img  busybox-static + the virtio modules + guest/init + ferry-guest (gcc -static)
//   root-<inputs>.qcow2  a debootstrap --variant=minbase Debian filesystem (ext4, made with mkfs.ext4 -d):
//               realistic data for compression and dedup figures; VMs get overlays on it
// Cached: rebuilt only when an input changes (kernel package version, busybox version, the
// guest sources, this builder's version). Built in a temp folder and renamed into place.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { repoRoot } from '../config.js';
import { FerryError } from '../errors.js';
import { run } from '../util/exec.js';
import type { ImageManifest } from './catalog.js';

const BUILDER_VERSION = 2; // 2: inode tables zeroed by mkfs (see the root disk step)
const SUITE = 'bookworm';
const ROOT_SIZE = 1024 ** 3;
const MODULES = ['virtio_ring', 'virtio', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci', 'virtio_blk', 'failover', 'net_failover', 'virtio_net', 'evdev', 'button'];

const guestSrc = (f: string) => path.join(repoRoot, 'guest', f);

type Say = (msg: string) => void;

async function kernelPackage(): Promise<{ name: string; version: string }> {
  const r = await run('apt-cache', ['depends', 'linux-image-cloud-amd64']);
  const m = /Depends: (linux-image-[0-9][^\s]*-cloud-amd64)/.exec(r.stdout);
  if (!m) throw new FerryError('COMMAND_FAILED', 'cannot resolve linux-image-cloud-amd64 (run `apt-get update`)');
  const p = await run('apt-cache', ['policy', m[1]!]);
  const v = /Candidate: (\S+)/.exec(p.stdout)?.[1] ?? 'unknown';
  return { name: m[1]!, version: v };
}

async function dpkgVersion(pkg: string): Promise<string> {
  return (await run('dpkg-query', ['-W', '-f=${Version}', pkg])).stdout.trim();
}

function debianMirror(): string {
  if (process.env.FERRY_DEBIAN_MIRROR) return process.env.FERRY_DEBIAN_MIRROR;
  for (const f of ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list']) {
    try {
      const t = fs.readFileSync(f, 'utf8');
      const m = /URIs:\s*(\S+\/debian)\s*$/m.exec(t) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+\/debian)\s+bookworm\b/m.exec(t);
      if (m) return m[1]!;
    } catch {
      /* try the next */
    }
  }
  return 'http://deb.debian.org/debian';
}

export async function inputsHash(kernel: { name: string; version: string }): Promise<string> {
  const h = crypto.createHash('sha256');
  h.update(`builder=${BUILDER_VERSION};suite=${SUITE};kernel=${kernel.name}=${kernel.version};`);
  h.update(`busybox=${await dpkgVersion('busybox-static')};`);
  h.update(fs.readFileSync(guestSrc('ferry-guest.c')));
  h.update(fs.readFileSync(guestSrc('init')));
  return h.digest('hex').slice(0, 16);
}

export interface BuildResult {
  dir: string;
  manifest: ImageManifest;
  rebuilt: boolean;
}

/** Builds (or finds up to date) the guest image at `<imagesDir>/<name>`. */
export async function buildGuestImage(imagesDir: string, opts: { name?: string; force?: boolean; say?: Say } = {}): Promise<BuildResult> {
  const name = opts.name ?? 'ferry-guest';
  const say = opts.say ?? (() => {});
  const out = path.join(imagesDir, name);
  const kernel = await kernelPackage();
  const hash = await inputsHash(kernel);
  const manifestFile = path.join(out, 'manifest.json');
  if (!opts.force && fs.existsSync(manifestFile)) {
    const m = JSON.parse(fs.readFileSync(manifestFile, 'utf8')) as ImageManifest;
    if (m.inputsHash === hash && Object.values(m.files).every((f) => fs.existsSync(path.join(out, f)))) {
      say(`image ${name} is up to date (${out}, inputs ${hash})`);
      return { dir: out, manifest: m, rebuilt: false };
    }
  }
  fs.mkdirSync(imagesDir, { recursive: true });
  const work = fs.mkdtempSync(path.join(imagesDir, `.${name}.build-`));
  const stage = path.join(work, 'image');
  fs.mkdirSync(stage);
  try {
    say(`[1/5] kernel: apt-get download ${kernel.name} (${kernel.version})`);
    await run('apt-get', ['download', '-q', kernel.name], { cwd: work, timeoutMs: 600_000 });
    const deb = fs.readdirSync(work).find((f) => f.startsWith(kernel.name) && f.endsWith('.deb'));
    if (!deb) throw new FerryError('COMMAND_FAILED', `apt-get download ${kernel.name} produced no .deb`);
    const kx = path.join(work, 'kernel');
    await run('dpkg', ['-x', path.join(work, deb), kx]);
    const vmlinuz = fs.readdirSync(path.join(kx, 'boot')).find((f) => f.startsWith('vmlinuz-'))!;
    fs.copyFileSync(path.join(kx, 'boot', vmlinuz), path.join(stage, 'vmlinuz'));

    say('[2/5] ferry-guest: gcc -static guest/ferry-guest.c');
    await run('gcc', ['-O2', '-static', '-Wall', '-o', path.join(stage, 'ferry-guest'), guestSrc('ferry-guest.c')]);

    say('[3/5] initramfs: busybox-static + virtio modules + guest/init');
    const ir = path.join(work, 'initramfs');
    fs.mkdirSync(path.join(ir, 'bin'), { recursive: true });
    fs.mkdirSync(path.join(ir, 'lib', 'modules'), { recursive: true });
    fs.copyFileSync('/bin/busybox', path.join(ir, 'bin', 'busybox'));
    fs.copyFileSync(path.join(stage, 'ferry-guest'), path.join(ir, 'bin', 'ferry-guest'));
    fs.copyFileSync(guestSrc('init'), path.join(ir, 'init'));
    fs.chmodSync(path.join(ir, 'init'), 0o755);
    fs.chmodSync(path.join(ir, 'bin', 'ferry-guest'), 0o755);
    const modRoot = path.join(kx, 'lib', 'modules');
    const allMods = (await run('find', [modRoot, '-name', '*.ko'])).stdout.trim().split('\n');
    for (const m of MODULES) {
      const src = allMods.find((p) => path.basename(p) === `${m}.ko`);
      if (src) fs.copyFileSync(src, path.join(ir, 'lib', 'modules', `${m}.ko`));
      else if (['virtio', 'virtio_ring', 'virtio_pci', 'virtio_blk'].includes(m)) {
        throw new FerryError('COMMAND_FAILED', `kernel ${kernel.name} has no module ${m}.ko`);
      }
    }
    await run('sh', ['-c', `cd "${ir}" && find . | cpio -o -H newc --quiet | gzip -1 > "${path.join(stage, 'initrd.img')}"`]);

    say(`[4/5] root filesystem: debootstrap --variant=minbase ${SUITE} (${debianMirror()})`);
    const rootfs = path.join(work, 'rootfs');
    await run('debootstrap', ['--variant=minbase', SUITE, rootfs, debianMirror()], { timeoutMs: 1_200_000 });
    fs.copyFileSync(path.join(stage, 'ferry-guest'), path.join(rootfs, 'usr', 'local', 'bin', 'ferry-guest'));
    fs.rmSync(path.join(rootfs, 'var', 'cache', 'apt', 'archives'), { recursive: true, force: true });

    say('[5/5] root disk: mkfs.ext4 -d + qemu-img convert -O qcow2');
    const raw = path.join(work, 'root.img');
    // Inode tables and journal initialised now: otherwise every VM's kernel zeroes ~16 MiB of
    // inode tables in the background after its first boot (ext4lazyinit), into its own
    // overlay — writes that showed up as unexplained extra data in backups and migrations.
    await run('mkfs.ext4', ['-q', '-F', '-L', 'ferry-root', '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', rootfs, raw, String(ROOT_SIZE / 1024 / 1024) + 'M']);
    const rootName = `root-${hash}.qcow2`;
    await run('qemu-img', ['convert', '-O', 'qcow2', raw, path.join(stage, rootName)]);

    const manifest: ImageManifest = {
      name,
      inputsHash: hash,
      builtAt: new Date().toISOString(),
      kernelPackage: `${kernel.name}=${kernel.version}`,
      rootSizeBytes: ROOT_SIZE,
      files: { kernel: 'vmlinuz', initrd: 'initrd.img', root: rootName, tool: 'ferry-guest' },
    };
    fs.writeFileSync(path.join(stage, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    // The template is read-only (VMs write only to their overlays) and never deleted by a
    // rebuild: existing overlays name it as their backing file, so older templates move along.
    fs.chmodSync(path.join(stage, rootName), 0o444);
    const old = `${out}.old-${process.pid}`;
    if (fs.existsSync(out)) {
      for (const f of fs.readdirSync(out)) {
        if (/^root-[0-9a-f]+\.qcow2$/.test(f) && f !== rootName) fs.renameSync(path.join(out, f), path.join(stage, f));
      }
      fs.renameSync(out, old);
    }
    fs.renameSync(stage, out);
    fs.rmSync(old, { recursive: true, force: true });
    say(`image ${name} built in ${out}`);
    return { dir: out, manifest, rebuilt: true };
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}
