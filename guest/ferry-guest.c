/*
 * ferry-guest: the workload toolkit that runs inside Ferry's test guest.
 *
 * Why it exists: every claim Ferry makes about migration ("no write the guest saw completed is
 * lost", "the pause was N ms") is proven from inside the guest. This one static binary provides
 * the probes; it is built on the host (gcc -static) and packed into the guest's initramfs, and
 * the same binary runs on the host to check a disk image after the fact.
 *
 *   ferry-guest heartbeat [--hz N]                       "FERRY-HB <n>" lines at N Hz (default 10)
 *   ferry-guest writer --dev D --seed S [--rate B/s] [--start N] [--count N]
 *   ferry-guest check  --dev D --seed S --upto N
 *   ferry-guest memdirty --mib N [--pause-ms M]
 *
 * Record format (one 4096-byte block at a 4 KiB-aligned slot of the data disk, little endian):
 *   0  u8[8] magic "FERRYREC"     8  u64 seq        16 u64 seed       24 u64 slot
 *   32 u64 checksum (FNV-1a 64 of bytes 0..31 and 40..4095)           40 payload (PRNG(seed,seq))
 * The slot of record `seq` is a pure function of (seed, seq, slot count), so the checker can
 * recompute where every record must be and which later record may legitimately have replaced it.
 *
 * The writer opens the device O_DIRECT|O_DSYNC and prints "FERRY-DURABLE <seq>" only after the
 * write returned, i.e. after the (virtual) disk acknowledged it as durable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define BLK 4096
static const char MAGIC[8] = {'F', 'E', 'R', 'R', 'Y', 'R', 'E', 'C'};

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

static uint64_t slot_of(uint64_t seed, uint64_t seq, uint64_t slots) {
  uint64_t s = seed * 0x100000001B3ULL ^ seq;
  return splitmix(&s) % slots;
}

static uint64_t fnv(const unsigned char *b) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (int i = 0; i < BLK; i++) {
    if (i >= 32 && i < 40) continue;
    h ^= b[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void sleep_until(double t) {
  struct timespec ts;
  ts.tv_sec = (time_t)t;
  ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n > 0) { ssize_t w = write(1, line, (size_t)n); (void)w; }
}

static const char *arg(int argc, char **argv, const char *name, const char *def) {
  for (int i = 2; i + 1 < argc; i++)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return def;
}

static uint64_t dev_size(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return 0;
  if (S_ISBLK(st.st_mode)) {
    uint64_t sz = 0;
    if (ioctl(fd, BLKGETSIZE64, &sz) != 0) return 0;
    return sz;
  }
  return (uint64_t)st.st_size;
}

static int heartbeat(int argc, char **argv) {
  double hz = atof(arg(argc, argv, "--hz", "10"));
  if (hz <= 0) hz = 10;
  double period = 1.0 / hz, t = now_s();
  for (uint64_t n = 1;; n++) {
    say("FERRY-HB %llu\n", (unsigned long long)n);
    t += period;
    double now = now_s();
    if (t < now) t = now; /* after a pause, do not burst to catch up */
    sleep_until(t);
  }
  return 0;
}

static void fill_record(unsigned char *b, uint64_t seed, uint64_t seq, uint64_t slot) {
  memcpy(b, MAGIC, 8);
  put64(b + 8, seq);
  put64(b + 16, seed);
  put64(b + 24, slot);
  uint64_t s = seed ^ (seq << 1);
  for (int i = 40; i + 8 <= BLK; i += 8) put64(b + i, splitmix(&s));
  put64(b + 32, fnv(b));
}

static int writer(int argc, char **argv) {
  const char *dev = arg(argc, argv, "--dev", NULL);
  uint64_t seed = strtoull(arg(argc, argv, "--seed", "1"), NULL, 0);
  double rate = atof(arg(argc, argv, "--rate", "102400"));
  uint64_t seq = strtoull(arg(argc, argv, "--start", "1"), NULL, 0);
  uint64_t count = strtoull(arg(argc, argv, "--count", "0"), NULL, 0);
  if (!dev) { say("FERRY-ERROR writer: --dev is required\n"); return 2; }
  int fd = open(dev, O_RDWR | O_DIRECT | O_DSYNC);
  if (fd < 0) { say("FERRY-ERROR writer: open %s: %s\n", dev, strerror(errno)); return 1; }
  uint64_t slots = dev_size(fd) / BLK;
  if (slots == 0) { say("FERRY-ERROR writer: %s is empty\n", dev); return 1; }
  unsigned char *b;
  if (posix_memalign((void **)&b, BLK, BLK) != 0) return 1;
  double period = rate > 0 ? BLK / rate : 0, t = now_s();
  say("FERRY-WRITER start seq=%llu seed=%llu slots=%llu\n", (unsigned long long)seq,
      (unsigned long long)seed, (unsigned long long)slots);
  for (uint64_t done = 0; count == 0 || done < count; done++, seq++) {
    uint64_t slot = slot_of(seed, seq, slots);
    fill_record(b, seed, seq, slot);
    if (pwrite(fd, b, BLK, (off_t)(slot * BLK)) != BLK) {
      say("FERRY-ERROR writer: write seq=%llu: %s\n", (unsigned long long)seq, strerror(errno));
      return 1;
    }
    say("FERRY-DURABLE %llu\n", (unsigned long long)seq);
    if (period > 0) {
      t += period;
      double now = now_s();
      if (t < now - 1) t = now;
      sleep_until(t);
    }
  }
  return 0;
}

static int check(int argc, char **argv) {
  const char *dev = arg(argc, argv, "--dev", NULL);
  uint64_t seed = strtoull(arg(argc, argv, "--seed", "1"), NULL, 0);
  uint64_t upto = strtoull(arg(argc, argv, "--upto", "0"), NULL, 0);
  uint64_t from = strtoull(arg(argc, argv, "--from", "1"), NULL, 0);
  if (!dev) { say("FERRY-ERROR check: --dev is required\n"); return 2; }
  int fd = open(dev, O_RDONLY);
  if (fd < 0) { say("FERRY-ERROR check: open %s: %s\n", dev, strerror(errno)); return 1; }
  uint64_t slots = dev_size(fd) / BLK;
  if (slots == 0) { say("FERRY-ERROR check: %s is empty\n", dev); return 1; }
  uint64_t *latest = calloc(slots, sizeof *latest);
  unsigned char *b = malloc(BLK);
  if (!latest || !b) { say("FERRY-ERROR check: out of memory\n"); return 1; }
  for (uint64_t q = from; q <= upto; q++) latest[slot_of(seed, q, slots)] = q;
  uint64_t checked = 0, bad = 0;
  for (uint64_t s = 0; s < slots; s++) {
    uint64_t want = latest[s];
    if (!want) continue;
    checked++;
    const char *why = NULL;
    uint64_t got = 0;
    if (pread(fd, b, BLK, (off_t)(s * BLK)) != BLK) why = "short read";
    else if (memcmp(b, MAGIC, 8) != 0) why = "no record";
    else if (get64(b + 32) != fnv(b)) why = "checksum mismatch";
    else if (get64(b + 16) != seed || get64(b + 24) != s) why = "foreign record";
    else if ((got = get64(b + 8)) < want) why = "stale record";
    else if (slot_of(seed, got, slots) != s) why = "misplaced record";
    if (why) {
      bad++;
      if (bad <= 20)
        say("FERRY-CHECK bad slot=%llu want>=%llu got=%llu: %s\n", (unsigned long long)s,
            (unsigned long long)want, (unsigned long long)got, why);
    }
  }
  if (bad) {
    say("FERRY-CHECK FAIL upto=%llu slots_checked=%llu bad=%llu\n", (unsigned long long)upto,
        (unsigned long long)checked, (unsigned long long)bad);
    return 1;
  }
  say("FERRY-CHECK OK upto=%llu slots_checked=%llu\n", (unsigned long long)upto,
      (unsigned long long)checked);
  return 0;
}

static int memdirty(int argc, char **argv) {
  uint64_t mib = strtoull(arg(argc, argv, "--mib", "16"), NULL, 0);
  int pause_ms = atoi(arg(argc, argv, "--pause-ms", "10"));
  size_t len = (size_t)mib << 20;
  unsigned char *m = malloc(len);
  if (!m) { say("FERRY-ERROR memdirty: cannot allocate %llu MiB\n", (unsigned long long)mib); return 1; }
  uint64_t s = 42;
  say("FERRY-MEMDIRTY start mib=%llu\n", (unsigned long long)mib);
  for (;;) {
    for (size_t off = 0; off < len; off += BLK) put64(m + off, splitmix(&s));
    if (pause_ms > 0) usleep((useconds_t)pause_ms * 1000);
  }
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (argc >= 2 && strcmp(argv[1], "heartbeat") == 0) return heartbeat(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "writer") == 0) return writer(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "check") == 0) return check(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "memdirty") == 0) return memdirty(argc, argv);
  fprintf(stderr,
          "usage: ferry-guest heartbeat [--hz N]\n"
          "       ferry-guest writer --dev D --seed S [--rate BYTES_PER_S] [--start SEQ] [--count N]\n"
          "       ferry-guest check --dev D --seed S --upto SEQ [--from SEQ]\n"
          "       ferry-guest memdirty --mib N [--pause-ms M]\n");
  return 2;
}
