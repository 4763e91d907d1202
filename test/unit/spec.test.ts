// VM spec validation, kernel command line, QEMU argv, and size parsing: pure functions.
import { describe, expect, it } from 'vitest';
import { qemuArgs } from '../../src/qemu/cmdline.js';
import { kernelCmdline, validateName, validateWorkload, checkRange, type VmSpec } from '../../src/vm/spec.js';
import { parseSize, formatBytes } from '../../src/util/units.js';

const spec: VmSpec = {
  name: 'web-1',
  uuid: '11111111-2222-3333-4444-555555555555',
  vcpus: 2,
  memoryMiB: 512,
  image: 'ferry-guest',
  kernel: '/img/vmlinuz',
  initrd: '/img/initrd.img',
  disks: [
    { id: 'vda', file: 'vda.qcow2', sizeBytes: 1 << 30, backing: '/img/root.qcow2' },
    { id: 'vdb', file: '/data/imported.qcow2', sizeBytes: 1 << 28 },
  ],
  nics: [{ id: 'net0', type: 'user', mac: '52:54:00:aa:bb:cc' }],
  workload: { heartbeatHz: 10, writeRate: 102400, seed: 9, dirtyMiB: 16 },
};

describe('VM names', () => {
  it.each(['a', 'web-1', '0db', 'a'.repeat(63)])('accepts %s', (n) => expect(validateName(n)).toBe(n));
  it.each(['', 'Web', '-a', 'a_b', 'a.b', 'a'.repeat(64), 'é', '../x', 42, null])('rejects %s with INVALID_NAME', (n) => {
    expect(() => validateName(n)).toThrow(expect.objectContaining({ code: 'INVALID_NAME' }));
  });
});

describe('ranges and workload', () => {
  it('rejects out-of-range sizes with SIZE_OUT_OF_RANGE and non-integers with INVALID_ARGUMENT', () => {
    expect(() => checkRange('vcpus', 0, 1, 64)).toThrow(expect.objectContaining({ code: 'SIZE_OUT_OF_RANGE' }));
    expect(() => checkRange('vcpus', 1.5, 1, 64)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
    expect(() => checkRange('vcpus', '2', 1, 64)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
  });
  it('rejects unknown workload fields', () => {
    expect(() => validateWorkload({ hb: 1 })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }));
    expect(validateWorkload({ heartbeatHz: 10 })).toEqual({ heartbeatHz: 10 });
  });
});

describe('kernel command line', () => {
  it('starts the writer on the first data disk with its seed', () => {
    expect(kernelCmdline(spec)).toBe('console=ttyS0 quiet panic=-1 ferry.hb=10 ferry.wdev=/dev/vdb ferry.wrate=102400 ferry.seed=9 ferry.dirty=16');
  });
  it('leaves the writer off without a data disk', () => {
    expect(kernelCmdline({ ...spec, disks: spec.disks.slice(0, 1) })).not.toContain('ferry.wdev');
  });
});

describe('qemuArgs', () => {
  const paths = { dir: '/d/vms/web-1', qmpSocket: '/d/run/1111.qmp', serialSocket: '/d/run/1111.serial', serialLog: '/d/vms/web-1/serial.log', qemuLog: '/d/q.log', pidFile: '/d/run/1111.pid', ramFile: '/dev/shm/ferry-x-1111.ram' };
  const a = qemuArgs(spec, paths, 'tcg', { startPaused: true });
  const joined = a.join(' ');
  it('uses the verified launch shape', () => {
    expect(joined).toContain('-accel tcg -machine pc,memory-backend=pc.ram -object memory-backend-file,id=pc.ram,size=512M,mem-path=/dev/shm/ferry-x-1111.ram,share=on -cpu qemu64 -m 512 -smp 2 -display none -nodefaults -no-user-config');
    expect(joined).toContain('-uuid 11111111-2222-3333-4444-555555555555');
    expect(joined).toContain('-qmp unix:/d/run/1111.qmp,server=on,wait=off');
    expect(joined).toContain('socket,id=ser0,path=/d/run/1111.serial,server=on,wait=off,logfile=/d/vms/web-1/serial.log,logappend=on');
    expect(a[a.length - 1]).toBe('-S');
  });
  it('names block nodes disk<N> on proto<N>, relative files inside the VM dir, absolute as given', () => {
    expect(joined).toContain('driver=file,filename=/d/vms/web-1/vda.qcow2,node-name=proto0');
    expect(joined).toContain('driver=qcow2,file=proto0,node-name=disk0');
    expect(joined).toContain('virtio-blk-pci,drive=disk0,id=vd0');
    expect(joined).toContain('driver=file,filename=/data/imported.qcow2,node-name=proto1');
    expect(joined).toContain('virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:aa:bb:cc');
  });
  it('uses -cpu host under KVM and -incoming defer for a migration destination', () => {
    const k = qemuArgs(spec, paths, 'kvm', { incoming: true }).join(' ');
    expect(k).toContain('-accel kvm -machine pc,memory-backend=pc.ram');
    expect(k).toContain('-cpu host');
    expect(k).toContain('-incoming defer');
  });
});

describe('sizes', () => {
  it.each([
    ['4096', 4096],
    ['512M', 512 * 2 ** 20],
    ['1G', 2 ** 30],
    ['1.5G', 1.5 * 2 ** 30],
    ['100K', 102400],
    ['2GiB', 2 ** 31],
  ])('parses %s', (t, n) => expect(parseSize(t)).toBe(n));
  it.each(['', 'abc', '-1M', '1X', '1 2'])('rejects %s', (t) => expect(() => parseSize(t)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' })));
  it('formats', () => expect(formatBytes(3 * 2 ** 20)).toBe('3.0 MiB'));
});
