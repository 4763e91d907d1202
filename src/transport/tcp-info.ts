// Why this file exists: whether a TCP connection is recovering a lost segment, from the kernel
// (getsockopt TCP_INFO through Ferry's addon, native/tcpinfo.c). The session's stuck test
// (session.ts) needs it: a frame written to such a connection waits behind the recovery, a
// round trip or more, and acknowledgements cannot show it once the receiver rebuilt the frames
// in flight on it from parity (measured on wan-10: a connection whose parity frame was lost got
// two more of the pause's frames, each rebuilt or waited for ~90 ms). Without the addon
// (FERRY_NATIVE=0, or not Linux) it answers `false` and the session relies on acknowledgements.
import type { Duplex } from 'node:stream';
import { nativeAddon } from '../util/native.js';

/**
 * True when the socket's TCP holds a hole the receiver waits for: out-of-order acknowledgements
 * seen (disorder), in fast recovery or loss recovery, or segments marked lost. A TLS socket's
 * handle carries the TCP descriptor too.
 */
export function tcpRecovering(sock: Duplex): boolean {
  const n = nativeAddon();
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (!n || typeof fd !== 'number' || fd < 0) return false;
  const i = n.tcpInfo(fd);
  if (!i) return false;
  const [caState, lost] = i as [number, number];
  return caState === 1 || caState >= 3 || lost > 0;
}
