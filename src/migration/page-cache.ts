// Why this file exists: the page cache of the RAM codec (ram-codec.ts), kept identical on both
// agents by construction: each side applies the same page records in the same order. Typed arrays
// only: a claim is O(1) array work, no hashing of page keys, no object per page.
export const PAGE = 4096;
export const WORDS = PAGE / 4;

/**
 * The pages both sides last saw, least recently sent first: a slab of 4 KiB slots, per block a
 * page → slot table, and the slots in a doubly linked list by the order they were last sent.
 */
export class PageCache {
  /** every slot's words: slot s is words[s * 1024, (s + 1) * 1024); `bytes` the same memory */
  readonly words: Int32Array;
  readonly bytes: Buffer;
  private readonly tables: Int32Array[] = []; // per block: page number → slot + 1 (0: none)
  private readonly owner: Float64Array; // per slot: block index * 2^32 + page number
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private head = -1;
  private tail = -1;
  private used = 0;

  constructor(bytes: number) {
    const n = Math.max(1, Math.floor(bytes / PAGE));
    this.words = new Int32Array(new ArrayBuffer(n * PAGE));
    this.bytes = Buffer.from(this.words.buffer);
    this.owner = new Float64Array(n);
    this.prev = new Int32Array(n);
    this.next = new Int32Array(n);
  }

  /** The page's slot, or -1. */
  slot(block: number, page: number): number {
    const t = this.tables[block];
    return t && page < t.length ? t[page]! - 1 : -1;
  }

  /**
   * The slot the page's new content goes to, now the most recently sent: its own if it has one,
   * else a free one or the least recently sent page's.
   */
  claim(block: number, page: number): number {
    let t = this.tables[block];
    if (!t || page >= t.length) {
      const grown = new Int32Array(Math.max(page + 1, (t?.length ?? 0) * 2, 1024));
      if (t) grown.set(t);
      this.tables[block] = t = grown;
    }
    let s = t[page]! - 1;
    if (s >= 0) this.unlink(s);
    else if (this.used < this.owner.length) s = this.used++;
    else {
      s = this.head; // the least recently sent page leaves
      this.unlink(s);
      const o = this.owner[s]!;
      this.tables[Math.floor(o / 2 ** 32)]![o % 2 ** 32] = 0;
    }
    t[page] = s + 1;
    this.owner[s] = block * 2 ** 32 + page;
    this.prev[s] = this.tail;
    this.next[s] = -1;
    if (this.tail >= 0) this.next[this.tail] = s;
    else this.head = s;
    this.tail = s;
    return s;
  }

  private unlink(s: number): void {
    const p = this.prev[s]!;
    const n = this.next[s]!;
    if (p >= 0) this.next[p] = n;
    else this.head = n;
    if (n >= 0) this.prev[n] = p;
    else this.tail = p;
  }
}
