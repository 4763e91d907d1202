// Why this file exists: the destination's half of the guest-RAM check (ram-verify.ts), moved out
// of the pause. Hashing all guest RAM after QEMU loaded it cost ~90 ms of every switchover on
// the lab's two cores. The destination instead reads the stream it feeds QEMU
// (qemu/migration-stream.ts) to learn which 1 MiB groups each page record touches, hashes a
// group during the pre-copy once QEMU has read well past the last record that touched it, and once
// QEMU has loaded everything hashes only the groups touched since and not yet hashed. In the
// pause the same refresh runs every 10 ms (destination.ts): the last pages arrive at the link's
// pace, so most groups they touch are hashed before QEMU is done.
//
// Soundness: a group's early hash is kept only if no record for it was forwarded after the hash
// was taken, and it is taken only once every record for the group lies MARGIN behind what QEMU's
// socket has taken; QEMU loads each page as it parses its record, and at most its socket's kernel
// buffer and its own read buffer lie between, so the group cannot change after the hash: QEMU
// writes guest RAM only from the stream while it is incoming. A group whose hash still differs
// from the source's is hashed again from memory before it counts as different (`rehashInto`).
// If the reader meets a stream it does not know, every group is hashed in the pause, as before.
// The source cannot do the same: its RAM is what QEMU's stream may miss (ram-verify.ts).
import { MigrationStreamReader } from '../qemu/migration-stream.js';
import { hashRam, hashSome, RAM_GROUP, RAM_HASH_BYTES, RamHashJob, ramGroups } from './ram-hash.js';

/**
 * A group may be hashed early once QEMU has taken this many bytes of the stream beyond the
 * group's last page record: its socket's kernel buffer (≤ 208 KiB by default) and its own read
 * buffer (32 KiB) are all that can lie between taken and loaded.
 */
const MARGIN = 1 << 20;
/** At most this many groups per `refresh`. */
const BATCH = 64;
/** The RAM block that is the guest-RAM file (cmdline.ts: memory-backend id). */
const RAM_BLOCK = 'pc.ram';

export interface RamTrackStats {
  /** groups hashed in the pause */
  finalGroups: number;
  /** groups hashed during the pre-copy (counting repeats) */
  earlyGroups: number;
  /** why the stream reader gave up, if it did (then every group was hashed in the pause) */
  readerStopped?: string;
}

export class RamTracker {
  private readonly reader: MigrationStreamReader;
  private readonly groups: number;
  /** per group: generation of the last page record seen, where in the stream, and the generation its hash covers */
  private readonly seenGen: Float64Array;
  private readonly seenPos: Float64Array;
  private readonly hashGen: Float64Array;
  private readonly hashes: Buffer;
  private gen = 1;
  /** stream bytes fed so far (a record is placed at the end of the chunk that holds it) */
  private fed = 0;
  private busy: Promise<void> | undefined;
  private job: RamHashJob | undefined;
  private closed = false;
  private earlyGroups = 0;

  constructor(
    private readonly file: string,
    bytes: number,
    private readonly margin = MARGIN,
  ) {
    this.groups = ramGroups(bytes);
    this.seenGen = new Float64Array(this.groups).fill(1);
    this.seenPos = new Float64Array(this.groups);
    this.hashGen = new Float64Array(this.groups);
    this.hashes = Buffer.alloc(this.groups * RAM_HASH_BYTES);
    this.reader = new MigrationStreamReader({
      page: (block, offset) => {
        if (block !== RAM_BLOCK) return;
        const g = Math.floor(offset / RAM_GROUP);
        if (g >= this.groups) return;
        this.seenGen[g] = ++this.gen;
        this.seenPos[g] = this.fed;
      },
    });
  }

  /** Every byte forwarded to QEMU, in order, as it is forwarded. */
  feed(b: Buffer): void {
    this.fed += b.length;
    if (!this.reader.stopped) this.reader.push(b);
  }

  /**
   * Hashes groups not hashed since their last page record, if QEMU has read MARGIN bytes past
   * it (`pending`: bytes fed that are still buffered in this process, not yet in QEMU's socket).
   */
  refresh(pending: number): Promise<void> {
    if (this.busy || this.closed || this.reader.stopped) return this.busy ?? Promise.resolve();
    const taken = this.fed - pending - this.margin;
    const todo: number[] = [];
    for (let g = 0; g < this.groups && todo.length < BATCH; g++) if (this.hashGen[g]! < this.seenGen[g]! && this.seenPos[g]! <= taken) todo.push(g);
    if (!todo.length) return Promise.resolve();
    const covers = todo.map((g) => this.seenGen[g]!);
    // One thread: the other core is the decoder's and QEMU's, whose loading the pause waits for.
    const job = (this.job = new RamHashJob(this.file, todo));
    job.width(1);
    this.busy = job.done
      .then((h) => {
        todo.forEach((g, i) => {
          if (this.seenGen[g] !== covers[i]) return; // touched while hashing
          h.copy(this.hashes, g * RAM_HASH_BYTES, i * RAM_HASH_BYTES, (i + 1) * RAM_HASH_BYTES);
          this.hashGen[g] = covers[i]!;
        });
        this.earlyGroups += todo.length;
      })
      .catch(() => {}) // an early hash is an optimisation: the pause hashes what is missing
      .finally(() => {
        this.busy = undefined;
        this.job = undefined;
      });
    return this.busy;
  }

  /** The migration ended here: no further hashing (the job in progress stops after its group). */
  async stop(): Promise<void> {
    this.closed = true;
    this.job?.cancel();
    await this.busy;
  }

  /** QEMU has loaded the whole stream: every group's hash, hashing only the stale ones. */
  async final(): Promise<{ hashes: Buffer; stats: RamTrackStats }> {
    this.closed = true;
    // A refresh in progress stops after its current group (its groups stay stale, hashed below
    // at full width): waiting for up to BATCH groups on one thread cost the pause up to 30 ms.
    this.job?.cancel();
    await this.busy;
    const stopped = this.reader.stopped ?? (this.reader.finished ? undefined : 'the stream ended before the device state');
    if (stopped) return { hashes: await hashRam(this.file, this.groups * RAM_GROUP), stats: { finalGroups: this.groups, earlyGroups: this.earlyGroups, readerStopped: stopped } };
    const stale: number[] = [];
    for (let g = 0; g < this.groups; g++) if (this.hashGen[g]! < this.seenGen[g]!) stale.push(g);
    const h = await hashSome(this.file, stale);
    stale.forEach((g, i) => h.copy(this.hashes, g * RAM_HASH_BYTES, i * RAM_HASH_BYTES, (i + 1) * RAM_HASH_BYTES));
    return { hashes: Buffer.from(this.hashes), stats: { finalGroups: stale.length, earlyGroups: this.earlyGroups } };
  }
}
