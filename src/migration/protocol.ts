// Why this file exists: the one place that defines what two agents say to each other during a
// live migration, on top of one transport session (src/transport/, which gives ordered,
// exactly-once, resumable channels). Version 1. Zero is invalid in every enum.
//
// Channels
//   1 CONTROL  JSON messages {v:1, t, rid?, ...}: requests from the source, replies/events from
//              the destination (priority 0)
//   2 RAM      QEMU's migration stream, source QEMU → destination QEMU (priority 1): raw bytes,
//              or ram-codec.ts messages once `ram-ready` accepted the codec
//   3 DISK     disk records (priority 2): a 64-byte header, and for DATA the block's bytes as the
//              next message on the same channel (separate, so the transport's dedup and zero
//              elision see the bare block)
//   4 FILE     snapshot images and memory states (snapshot-chain.ts, priority 3): per file a JSON
//              message {name, size}, then its bytes in messages of ≤ 64 KiB
//
// Disk record header (big endian)
//   0  u16 magic 0x4644 ("FD")   2 u8 version (1)   3 u8 kind (1 DATA, 2 ZERO, 3 BARRIER)
//   4  u8 disk index             5 u8 flags (bit 0: the final round, sent with the guest paused)
//   6..7 reserved (0)
//   8  u64 offset                16 u32 length        20 u32 round / barrier number
//   24 u8[32] SHA-256 of the block (DATA), zeros otherwise       56..63 reserved
//   A BARRIER asks the destination to flush, read back and verify every block written since the
//   previous barrier, and answer CONTROL `barrier-ok` {n, verified, mismatches}. Because it
//   travels on the DISK channel it is ordered after every block sent before it.
//
// Phases (source S drives; each is journaled on its side before its side effects)
//
//   S: begin ──► prepare ──► disk ──► ram ──► switchover ──► confirm ──► done
//        │          │         │        │          │
//        └──────────┴─────────┴────────┴──► rollback (VM keeps/resumes running at S) ──► failed
//   D:            prepare ──► receiving ─────────► finishing ──► running ──► done
//                    └───────────┴────────────────────┴──► aborted (QEMU killed, disks cached)
//
//   begin      S→D `begin` {spec, chain?, …}; D answers `begin-ok` {problems[]} — every refusal at once
//   (files)    only for a VM with snapshots: S→D `files` {files}; D answers `files-want` {names,
//              partial?} (those not already in its migration cache; `partial`: a file a previous
//              attempt cut short, {name, bytes, sha256} of the prefix it holds); S sends them on
//              FILE — from the prefix's end when its own prefix hashes the same — then
//              `files-done`; D answers `files-ok` once each arrived whole with its SHA-256
//   prepare    S→D `prepare`; D creates disks, starts QEMU -incoming defer, exports its disks
//              on a local NBD socket; answers `prepared` {disks:[{id, base}]}
//   disk       DISK records in rounds of dirty blocks; `verify` barrier → D answers group hashes
//   ram        S→D `ram-start` {caps, codec?}; D sets the same capabilities (caps.noVmdesc: QEMU's
//              `suppress-vmdesc` on both), runs migrate-incoming and answers `ram-ready` {codec?};
//              QEMU's stream flows on RAM (page-delta encoded if D accepted the codec,
//              ram-codec.ts); disk rounds continue
//   switchover QEMU paused at pre-switchover: S sends the final disk round + FINAL barrier, then
//              migrate-continue. When S's QEMU closed its stream, S sends `ram-end` {bytes,
//              stream, streamHash, groups, groupHash}: the count and XXH128 of every RAM-stream
//              byte its QEMU wrote, and the XXH128 of each 1 MiB of guest RAM (hashed while the
//              guest is paused). D flushes/
//              verifies the disks, waits for QEMU `completed`, checks that it fed QEMU exactly
//              those bytes, hashes its guest RAM, asks `ram-fix` {groups} for any group that
//              differs (S answers `ram-fixed` {data}) and writes them, journals `running`, `cont`,
//              announces, and sends `running` (or `failed`)
//   confirm    S quits its QEMU and deletes the source copy, then sends `confirm`; D → done
//   query      after a crash, S asks `query` {id} on a new session; D answers `state` {phase}
import { FerryError } from '../errors.js';
import type { VmSpec } from '../vm/spec.js';
import type { ChainFile, ChainManifest } from './snapshot-chain.js';

export const PROTOCOL_VERSION = 1;
export const TRANSPORT_PORT = 7451;

export const CH = { CONTROL: 1, RAM: 2, DISK: 3, FILE: 4 } as const;

export enum RecordKind {
  DATA = 1,
  ZERO = 2,
  BARRIER = 3,
}

export const HEADER_BYTES = 64;
const MAGIC = 0x4644;

export interface DiskRecord {
  kind: RecordKind;
  disk: number;
  offset: number;
  length: number;
  /** round for DATA/ZERO, barrier number for BARRIER */
  n: number;
  hash?: Buffer;
  /** RECORD_FINAL: part of the final round (the guest is paused) */
  flags?: number;
}

export const RECORD_FINAL = 1;

export function encodeRecord(r: DiskRecord): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  b.writeUInt16BE(MAGIC, 0);
  b.writeUInt8(PROTOCOL_VERSION, 2);
  b.writeUInt8(r.kind, 3);
  b.writeUInt8(r.disk, 4);
  b.writeUInt8(r.flags ?? 0, 5);
  b.writeBigUInt64BE(BigInt(r.offset), 8);
  b.writeUInt32BE(r.length, 16);
  b.writeUInt32BE(r.n, 20);
  if (r.hash) r.hash.copy(b, 24, 0, 32);
  return b;
}

export function decodeRecord(b: Buffer): DiskRecord {
  if (b.length !== HEADER_BYTES || b.readUInt16BE(0) !== MAGIC) throw new FerryError('TRANSPORT_PROTOCOL', 'migration: malformed disk record header');
  if (b.readUInt8(2) !== PROTOCOL_VERSION) throw new FerryError('TRANSPORT_PROTOCOL', `migration: disk record version ${b.readUInt8(2)} (this agent speaks ${PROTOCOL_VERSION})`);
  const kind = b.readUInt8(3) as RecordKind;
  if (!(kind in RecordKind)) throw new FerryError('TRANSPORT_PROTOCOL', `migration: unknown disk record kind ${kind}`);
  const flags = b.readUInt8(5);
  return { kind, disk: b.readUInt8(4), ...(flags ? { flags } : {}), offset: Number(b.readBigUInt64BE(8)), length: b.readUInt32BE(16), n: b.readUInt32BE(20), ...(kind === RecordKind.DATA ? { hash: Buffer.from(b.subarray(24, 56)) } : {}) };
}

/** What the destination answers about each disk it prepared. */
export interface PreparedDisk {
  id: string;
  sizeBytes: number;
  /**
   * What the destination's empty disk already reads as: 'template' (an overlay on the same
   * backing template: only the source's top layer must be sent), 'zero' (a blank disk), or
   * 'cached' (a previous attempt's copy of this VM's disk: compare hashes, send the difference).
   */
  base: 'template' | 'zero' | 'cached';
}

export interface VerifyRequest {
  disk: number;
  /** bytes per hashed chunk and chunks per group (a group hash is SHA-256 of its chunk hashes) */
  chunk: number;
  group: number;
  /** group indexes to hash; absent = all */
  groups?: number[];
}

/** Control messages. `rid` pairs a request with its reply. */
/** The first `bytes` of a file a previous attempt cut short, as the destination holds them. */
export interface FilePrefix {
  name: string;
  bytes: number;
  sha256: string;
}

export type Control =
  | { t: 'begin'; rid: number; id: string; spec: VmSpec; from: string; qemuVersion: string; machine: string; chain?: ChainManifest }
  | { t: 'files'; rid: number; files: ChainFile[] }
  | { t: 'files-want'; rid: number; names: string[]; partial?: FilePrefix[] }
  | { t: 'files-done'; rid: number }
  | { t: 'files-ok'; rid: number }
  | { t: 'begin-ok'; rid: number; problems: string[] }
  | { t: 'prepare'; rid: number; id: string }
  | { t: 'prepared'; rid: number; disks: PreparedDisk[] }
  | { t: 'verify'; rid: number; req: VerifyRequest }
  | { t: 'hashes'; rid: number; disk: number; groups: number[]; hashes: string }
  | { t: 'barrier-ok'; n: number; verified: number; mismatches: { disk: number; offset: number; length: number }[] }
  /** codec: the source offers its page-delta codec (ram-codec.ts) with a page cache of that size */
  | { t: 'ram-start'; rid: number; caps: { xbzrle: boolean; autoConverge: boolean; noVmdesc?: boolean }; params: Record<string, number>; codec?: { v: number; cacheBytes: number } }
  /** codec: the version the destination will decode (absent: the stream comes as QEMU wrote it) */
  | { t: 'ram-ready'; rid: number; codec?: number }
  | { t: 'final'; n: number }
  /** groups: base64 of the `groupHash` (ram-verify.ts) of each 1 MiB of guest RAM (absent: RAM not file-backed) */
  /** stream: the `streamHash` (ram-pipe.ts) of every stream byte the source's QEMU wrote */
  | { t: 'ram-end'; bytes: number; stream: string; streamHash: string; groups?: string; groupHash?: string }
  | { t: 'ram-fix'; rid: number; groups: number[] }
  /** data: base64 of each requested group, in order */
  | { t: 'ram-fixed'; rid: number; data: string[] }
  | { t: 'running'; at: number; timings: Record<string, number> }
  | { t: 'failed'; reason: string }
  | { t: 'confirm'; id?: string }
  | { t: 'abort'; reason: string }
  | { t: 'query'; rid: number; id: string }
  | { t: 'state'; rid: number; phase: string | null }
  | { t: 'error'; rid: number; code: string; message: string };

export function encodeControl(m: Control): Buffer {
  return Buffer.from(JSON.stringify({ v: PROTOCOL_VERSION, ...m }));
}

export function decodeControl(b: Buffer): Control {
  let m: { v?: number; t?: string };
  try {
    m = JSON.parse(b.toString()) as { v?: number; t?: string };
  } catch {
    throw new FerryError('TRANSPORT_PROTOCOL', 'migration: control message is not JSON');
  }
  if (m.v !== PROTOCOL_VERSION) throw new FerryError('TRANSPORT_PROTOCOL', `migration: peer speaks protocol ${m.v}, this agent ${PROTOCOL_VERSION}`);
  if (typeof m.t !== 'string') throw new FerryError('TRANSPORT_PROTOCOL', 'migration: control message without type');
  return m as Control;
}
