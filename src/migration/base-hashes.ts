// Why this file exists: group hashes of a template (a read-only backing image), cached next to
// it. Verifying whole disks (disk-source.ts `verify`, disk-dest.ts `hashes`) hashes every 1 MiB
// group on both ends; for an overlay on a 1 GiB template most groups read from the template, and
// hashing them again in every migration kept both hosts busy ~3 s with the link idle (wan-10).
//
// A group the overlay's own layer does not touch (qemu:allocation-depth is not 1 anywhere in it:
// the data comes from the template, or from nowhere and reads as zeroes) reads exactly as the
// template does at that offset, so it has the template's hash. Each host computes it once from its own copy of the template, the first
// time it hashes such a group, and keeps it in `<template>.ferry-groups` for as long as the
// template's size, mtime and inode are unchanged. Templates that differ between the two hosts
// still show up as differing groups: nothing is taken from the peer.
import fs from 'node:fs';
import { CHUNK, GROUP, select, type Range } from './blocks.js';
import type { NbdClient } from '../nbd/client.js';

const MAGIC = 'ferry-groups v1';

interface Key {
  size: number;
  mtimeMs: number;
  ino: number;
  chunk: number;
  group: number;
}

const open = new Map<string, BaseHashes>();

export class BaseHashes {
  private dirty = false;

  private constructor(
    readonly template: string,
    private readonly key: Key,
    private readonly hashes: Map<number, Buffer>,
  ) {}

  /** The cache of `template` for this hash geometry; null when the template cannot be read. */
  static for(template: string, chunk: number, group: number): BaseHashes | null {
    let st: fs.Stats;
    try {
      st = fs.statSync(template);
    } catch {
      return null;
    }
    const key: Key = { size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, chunk, group };
    const id = `${template}#${chunk}#${group}`;
    const have = open.get(id);
    if (have && sameKey(have.key, key)) return have;
    const c = new BaseHashes(template, key, readFile(cacheFile(template), key));
    open.set(id, c);
    return c;
  }

  get(g: number): Buffer | undefined {
    return this.hashes.get(g);
  }

  set(g: number, h: Buffer): void {
    if (this.hashes.get(g)?.equals(h)) return;
    this.hashes.set(g, h);
    this.dirty = true;
  }

  get size(): number {
    return this.hashes.size;
  }

  /** Writes new hashes (merged with what another agent wrote meanwhile); best effort. */
  save(): void {
    if (!this.dirty) return;
    const file = cacheFile(this.template);
    try {
      for (const [g, h] of readFile(file, this.key)) if (!this.hashes.has(g)) this.hashes.set(g, h);
      const body = Buffer.alloc(this.hashes.size * 36);
      let o = 0;
      for (const [g, h] of this.hashes) {
        body.writeUInt32BE(g, o);
        h.copy(body, o + 4);
        o += 36;
      }
      const tmp = `${file}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, Buffer.concat([Buffer.from(`${MAGIC} ${JSON.stringify(this.key)}\n`), body]));
      fs.renameSync(tmp, file);
      this.dirty = false;
    } catch {
      // A read-only image directory only costs the hashing next time.
    }
  }
}

function cacheFile(template: string): string {
  return `${template}.ferry-groups`;
}

function sameKey(a: Key, b: Key): boolean {
  return a.size === b.size && a.mtimeMs === b.mtimeMs && a.ino === b.ino && a.chunk === b.chunk && a.group === b.group;
}

/** The hashes in `file` if it was written for exactly `key`; empty otherwise. */
function readFile(file: string, key: Key): Map<number, Buffer> {
  const out = new Map<number, Buffer>();
  let b: Buffer;
  try {
    b = fs.readFileSync(file);
  } catch {
    return out;
  }
  const nl = b.indexOf(10);
  if (nl < 0) return out;
  const head = b.subarray(0, nl).toString();
  if (!head.startsWith(`${MAGIC} `)) return out;
  try {
    if (!sameKey(JSON.parse(head.slice(MAGIC.length + 1)) as Key, key)) return out;
  } catch {
    return out;
  }
  const body = b.subarray(nl + 1);
  for (let o = 0; o + 36 <= body.length; o += 36) out.set(body.readUInt32BE(o), Buffer.from(body.subarray(o + 4, o + 36)));
  return out;
}

/**
 * What `groupHashes` needs to use the cache of `backing` for a disk read through `nbd` (which
 * must have the qemu:allocation-depth context): the ranges the overlay's own layer does not touch.
 * Undefined when the disk has no template or the hashes are not the whole-disk ones (CHUNK, GROUP).
 */
export async function templateBase(nbd: NbdClient, backing: string | undefined, chunk: number, group: number): Promise<{ cache: BaseHashes; fromBase: Range[] } | undefined> {
  const cache = backing && chunk === CHUNK && group === GROUP ? BaseHashes.for(backing, chunk, group) : null;
  return cache ? { cache, fromBase: select(await nbd.map('qemu:allocation-depth'), (f) => f !== 1) } : undefined;
}
