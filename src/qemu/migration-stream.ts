// Why this file exists: Ferry carries QEMU's migration stream without understanding it, except for
// one thing the destination needs to know cheaply: which guest-RAM pages the stream (re)wrote, and
// when. With that, the destination hashes its guest RAM during the pre-copy and, in the pause,
// only the pages that came after (migration/ram-track.ts), instead of all of it.
//
// This is a reader of QEMU 7.2's precopy stream (migration/savevm.c, migration/ram.c), as
// checked on this machine (`migrate exec:cat > FILE`; the parser test rebuilds guest RAM from a
// real stream and compares it with the guest's memory file):
//
//   u32 magic "QEVM", u32 version 3
//   0x07 CONFIGURATION  u32 len, machine name, then subsections (0x05, u8 len, name, u32 version, fields)
//   0x01 SECTION_START  u32 section id, u8 len, idstr, u32 instance, u32 version, then for "ram":
//                       u64 total|MEM_SIZE, per RAM block {u8 len, idstr, u64 used length}, u64 EOS
//   0x02 SECTION_PART / 0x03 SECTION_END   u32 section id, then RAM page records up to u64 EOS
//   0x7e SECTION_FOOTER u32 section id
//   0x08 COMMAND        u16 command, u16 len, data
//   0x04 SECTION_FULL   device state (no length: nothing after it is parsed; no RAM follows it)
//   0x00 EOF
// A page record: u64 (offset in its block | flags); without CONTINUE, u8 len + block idstr; ZERO
// is followed by one fill byte, PAGE by the page. Anything else (XBZRLE, compressed pages, an
// iterable section other than "ram", an unknown subsection) stops the reader with a reason: the
// caller then treats every page as possibly changed. The reader never alters the stream.

const MAGIC = 0x5145564d;
const PAGE = 4096;
const F = { ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20 } as const;

export interface StreamEvents {
  /**
   * A page of `block` at byte `offset` was (re)written by the stream: with the page's bytes,
   * which start at stream offset `at`, or filled with byte `fill` (a zero page record). The
   * record (its header) starts at stream offset `rec`.
   */
  page(block: string, offset: number, p: { at: number } | { fill: number }, rec: number): void;
}

type State =
  | { s: 'header' }
  | { s: 'top' }
  | { s: 'ram-setup'; total: number; seen: number }
  | { s: 'ram-pages' }
  | { s: 'done' }
  | { s: 'stopped'; reason: string };

/** Incremental reader: `push` every chunk, in order, as it is forwarded to QEMU. */
export class MigrationStreamReader {
  private st: State = { s: 'header' };
  private carry = Buffer.alloc(0);
  private skip = 0;
  private ramSection = -1;
  private block = '';
  /** stream offset of the chunk being pushed */
  private base = 0;
  /** stream offset of the record being parsed */
  private recAt = 0;
  /** true once the device state began (the stream holds no more RAM) */
  get finished(): boolean {
    return this.st.s === 'done';
  }
  /**
   * Stream offset up to which every byte was parsed: what follows is a record cut by the end of
   * the last chunk, held until the next one (a page's bytes being skipped count as parsed).
   */
  get parsedTo(): number {
    return this.base - this.carry.length;
  }
  /** why the reader gave up, if it did */
  get stopped(): string | undefined {
    return this.st.s === 'stopped' ? this.st.reason : undefined;
  }

  constructor(private readonly ev: StreamEvents) {}

  push(chunk: Buffer): void {
    const base = this.base;
    this.base += chunk.length;
    let pos = 0;
    while (pos < chunk.length && this.st.s !== 'done' && this.st.s !== 'stopped') {
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - pos);
        this.skip -= n;
        pos += n;
        continue;
      }
      if (this.carry.length) {
        // A record cut by the previous chunk: join its start with enough of this chunk.
        const joined = Buffer.concat([this.carry, chunk.subarray(pos, pos + 1024)]);
        this.recAt = base + pos - this.carry.length;
        const used = this.record(joined);
        if (used === 0) {
          if (pos + 1024 >= chunk.length) {
            this.carry = joined;
            return;
          }
          this.stop('a record longer than 1 KiB');
          return;
        }
        pos += used - this.carry.length;
        this.carry = Buffer.alloc(0);
        continue;
      }
      this.recAt = base + pos;
      const used = this.record(chunk.subarray(pos));
      if (used === 0) {
        this.carry = Buffer.from(chunk.subarray(pos));
        return;
      }
      pos += used;
    }
  }

  private stop(reason: string): void {
    this.st = { s: 'stopped', reason };
  }

  /** Parses one record at the start of `b`: bytes used (page data goes to `skip`), or 0 if incomplete. */
  private record(b: Buffer): number {
    const st = this.st;
    switch (st.s) {
      case 'header': {
        if (b.length < 8) return 0;
        if (b.readUInt32BE(0) !== MAGIC || b.readUInt32BE(4) !== 3) return this.fail(`not a QEMU v3 migration stream`);
        this.st = { s: 'top' };
        return 8;
      }
      case 'top':
        return this.section(b);
      case 'ram-setup': {
        if (st.seen === st.total) {
          if (b.length < 8) return 0;
          if (!this.isEos(b)) return this.fail('RAM setup without EOS');
          this.st = { s: 'top' };
          return 8;
        }
        const name = str(b, 0);
        if (!name || b.length < name.end + 8) return 0;
        st.seen += Number(b.readBigUInt64BE(name.end));
        if (st.seen > st.total) return this.fail('RAM blocks larger than the announced total');
        return name.end + 8;
      }
      case 'ram-pages': {
        if (b.length < 8) return 0;
        const hdr = b.readBigUInt64BE(0);
        const flags = Number(hdr & 0xfffn);
        const offset = Number(hdr & ~0xfffn);
        if (flags === F.EOS) {
          this.st = { s: 'top' };
          return 8;
        }
        if (flags & ~(F.ZERO | F.PAGE | F.CONTINUE) || !(flags & (F.ZERO | F.PAGE))) return this.fail(`RAM record flags 0x${flags.toString(16)}`);
        let at = 8;
        if (!(flags & F.CONTINUE)) {
          const name = str(b, 8);
          if (!name) return 0;
          this.block = name.s;
          at = name.end;
        } else if (!this.block) return this.fail('CONTINUE before any block');
        if (flags & F.ZERO) {
          if (b.length < at + 1) return 0;
          this.ev.page(this.block, offset, { fill: b[at]! }, this.recAt);
          return at + 1;
        }
        this.skip = PAGE;
        this.ev.page(this.block, offset, { at: this.recAt + at }, this.recAt);
        return at;
      }
      case 'done':
      case 'stopped':
        return b.length;
    }
  }

  private section(b: Buffer): number {
    switch (b[0]) {
      case 0x00: // EOF
        this.st = { s: 'done' };
        return 1;
      case 0x04: // SECTION_FULL: device state follows, no more RAM
        this.st = { s: 'done' };
        return 1;
      case 0x07: {
        // CONFIGURATION: u32 len + name, then optional subsections
        if (b.length < 5) return 0;
        const n = b.readUInt32BE(1);
        if (n > 256) return this.fail('machine name too long');
        let at = 5 + n;
        while (true) {
          if (b.length < at + 1) return 0;
          if (b[at] !== 0x05) return at;
          const name = str(b, at + 1);
          if (!name || b.length < name.end + 4) return 0;
          at = name.end + 4;
          const r = subsection(name.s, b, at);
          if (r === undefined) return this.fail(`configuration subsection ${name.s}`);
          if (r === 0) return 0;
          at = r;
        }
      }
      case 0x01: {
        // SECTION_START: u32 id, idstr, u32 instance, u32 version
        if (b.length < 6) return 0;
        const name = str(b, 5);
        if (!name || b.length < name.end + 8) return 0;
        if (name.s !== 'ram') return this.fail(`iterable section "${name.s}"`);
        if (b.length < name.end + 16) return 0;
        this.ramSection = b.readUInt32BE(1);
        const sz = b.readBigUInt64BE(name.end + 8);
        if (Number(sz & 0xfffn) !== F.MEM_SIZE) return this.fail('RAM setup without MEM_SIZE');
        this.st = { s: 'ram-setup', total: Number(sz & ~0xfffn), seen: 0 };
        return name.end + 16;
      }
      case 0x02: // SECTION_PART
      case 0x03: {
        // SECTION_END
        if (b.length < 5) return 0;
        if (b.readUInt32BE(1) !== this.ramSection) return this.fail(`section ${b.readUInt32BE(1)} is not RAM`);
        this.st = { s: 'ram-pages' };
        return 5;
      }
      case 0x7e: // SECTION_FOOTER
        return b.length < 5 ? 0 : 5;
      case 0x08: {
        // COMMAND: u16 cmd, u16 len, data
        if (b.length < 5) return 0;
        const n = 5 + b.readUInt16BE(3);
        return b.length < n ? 0 : n;
      }
      default:
        return this.fail(`section type 0x${b[0]!.toString(16)}`);
    }
  }

  private isEos(b: Buffer): boolean {
    return b.readBigUInt64BE(0) === BigInt(F.EOS);
  }

  private fail(reason: string): number {
    this.stop(reason);
    return 1; // consumed: the loop ends on the stopped state
  }
}

/** u8 length + string at `at`, or undefined while incomplete. */
function str(b: Buffer, at: number): { s: string; end: number } | undefined {
  if (b.length < at + 1) return undefined;
  const end = at + 1 + b[at]!;
  if (b.length < end) return undefined;
  return { s: b.toString('latin1', at + 1, end), end };
}

/** The end of a known configuration subsection's fields, 0 while incomplete, undefined if unknown. */
function subsection(name: string, b: Buffer, at: number): number | undefined {
  switch (name) {
    case 'configuration/target-page-bits':
      return b.length < at + 4 ? 0 : at + 4;
    case 'configuration/uuid':
      return b.length < at + 16 ? 0 : at + 16;
    case 'configuration/capabilities': {
      if (b.length < at + 4) return 0;
      let p = at + 4;
      for (let i = b.readUInt32BE(at); i > 0; i--) {
        const s = str(b, p);
        if (!s) return 0;
        p = s.end;
      }
      return p;
    }
    default:
      return undefined;
  }
}
