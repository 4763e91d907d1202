// Why this file exists: Ferry's addon (native/: ramhash.c, tcpinfo.c) is loaded in one place, once
// per thread, for its two users (migration/ram-hash.ts, transport/tcp-info.ts). Where it did not
// build, or with FERRY_NATIVE=0 (for comparisons), it is null and each user falls back.
import { createRequire } from 'node:module';

/** The addon's calls. */
export interface NativeAddon {
  /** native/ramhash.c */
  map(fd: number, length: number): number;
  unmap(id: number): void;
  hashGroup(id: number, offset: number, length: number, out: Uint8Array, outOffset: number): boolean;
  /** native/tcpinfo.c: [caState, lost, retrans, unacked, rttUs], null if not a TCP socket */
  tcpInfo(fd: number): number[] | null;
}

let addon: NativeAddon | null | undefined;

export function nativeAddon(): NativeAddon | null {
  if (addon === undefined) {
    try {
      addon = process.env.FERRY_NATIVE === '0' ? null : (createRequire(import.meta.url)('ferry-native') as NativeAddon);
    } catch {
      addon = null;
    }
  }
  return addon;
}
