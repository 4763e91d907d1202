// Why this file exists: the one place a VmSpec becomes a QEMU argv. Pure (no I/O) so it is unit
// tested exactly. Shape verified on QEMU 7.2 (see ../shared/reference/qemu-7.2.md): blockdev
// node names `proto<N>`/`disk<N>`, devices `vd<N>`, serial and QMP on unix sockets, and the
// serial chardev also logs to a file so console output survives the agent being down.
import type { Accel } from './accel.js';
import { kernelCmdline, type VmSpec } from '../vm/spec.js';

export interface VmPaths {
  /** Directory holding the VM's disks and logs. */
  dir: string;
  qmpSocket: string;
  serialSocket: string;
  serialLog: string;
  qemuLog: string;
  pidFile: string;
  /**
   * Guest RAM, a shared file in /dev/shm: QEMU maps it, and the agent can read and write guest
   * memory while the VM is paused (a migration checks RAM end to end before the switchover).
   */
  ramFile: string;
}

export interface LaunchExtras {
  /** Start paused (-S); the agent sends `cont` once it is attached to QMP and serial. */
  startPaused?: boolean;
  /** `-incoming defer` for a migration destination. */
  incoming?: boolean;
}

export function diskNodeName(index: number): string {
  return `disk${index}`;
}

export function qemuArgs(spec: VmSpec, paths: VmPaths, accel: Accel, extras: LaunchExtras = {}): string[] {
  const a: string[] = [
    '-name', `${spec.name},debug-threads=on`,
    '-uuid', spec.uuid,
    '-accel', accel,
    '-machine', 'pc,memory-backend=pc.ram',
    '-object', `memory-backend-file,id=pc.ram,size=${spec.memoryMiB}M,mem-path=${paths.ramFile},share=on`,
    '-cpu', accel === 'kvm' ? 'host' : 'qemu64',
    '-m', String(spec.memoryMiB),
    '-smp', String(spec.vcpus),
    '-display', 'none',
    '-nodefaults',
    '-no-user-config',
    '-pidfile', paths.pidFile,
    '-qmp', `unix:${paths.qmpSocket},server=on,wait=off`,
    '-chardev', `socket,id=ser0,path=${paths.serialSocket},server=on,wait=off,logfile=${paths.serialLog},logappend=on`,
    '-serial', 'chardev:ser0',
  ];
  if (spec.kernel) {
    a.push('-kernel', spec.kernel);
    if (spec.initrd) a.push('-initrd', spec.initrd);
    a.push('-append', kernelCmdline(spec));
  }
  spec.disks.forEach((d, i) => {
    const file = d.file.startsWith('/') ? d.file : `${paths.dir}/${d.file}`;
    a.push(
      '-blockdev', `driver=file,filename=${file},node-name=proto${i},cache.direct=off,discard=unmap`,
      '-blockdev', `driver=qcow2,file=proto${i},node-name=${diskNodeName(i)},discard=unmap`,
      '-device', `virtio-blk-pci,drive=${diskNodeName(i)},id=vd${i}${i === 0 && !spec.kernel ? ',bootindex=0' : ''}`,
    );
  });
  spec.nics.forEach((n, i) => {
    a.push('-netdev', `user,id=net${i}`, '-device', `virtio-net-pci,netdev=net${i},id=${n.id},mac=${n.mac}`);
  });
  if (extras.startPaused) a.push('-S');
  if (extras.incoming) a.push('-incoming', 'defer');
  return a;
}
