/*
 * Why this file exists: the source agent hashes all of guest RAM while the guest is paused at a
 * migration's switchover (src/migration/ram-hash.ts), on cores the pause's other work needs.
 * From JavaScript that meant copying every MiB out of the RAM file (read(2): ~50 ms of a core
 * per 256 MiB here) and hashing it in WebAssembly (~45 ms more). Here the file is mapped once
 * (ahead of the pause, and touched once so its pages are mapped) and each 1 MiB group is
 * checked for zero and hashed with XXH3-128 where it lies. Mapping each group for each call
 * instead cost as much as the copy (page tables built and torn down every time). Same hash as
 * hash-wasm's XXH128 (canonical, big-endian bytes), so agents with and without this addon agree.
 *
 *   map(fd, length) -> id         maps the first `length` bytes of the open file, read-only
 *   hashGroup(id, offset, length, out, outOffset) -> boolean
 *                                 [offset, offset + length) of mapping `id` (clamped to it): true
 *                                 if whole and all zero (out untouched), else its 16-byte XXH3-128
 *                                 goes to out[outOffset…] and false
 *   unmap(id)                     unmaps once no thread is hashing in it
 *
 * A mapping belongs to the process: every worker thread that loads the addon sees the same ids.
 * Errors throw (code ERR_FERRY_NATIVE).
 */
#define XXH_INLINE_ALL
#include "xxhash.h"

#include <errno.h>
#include <node_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SLOTS 64

static struct slot {
  unsigned char *p;
  size_t len;
  int users;   /* threads hashing in it now */
  int closing; /* unmap asked: the last user unmaps */
} slots[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static napi_value fail(napi_env env, const char *what, int err) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, "ERR_FERRY_NATIVE", msg);
  return NULL;
}

static napi_value usage(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_FERRY_NATIVE", msg);
  return NULL;
}

static int args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  return napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == want;
}

static int all_zero(const unsigned char *p, size_t n) {
  const uint64_t *w = (const uint64_t *)p;
  size_t words = n / 8;
  for (size_t i = 0; i < words; i += 8) {
    size_t k = words - i < 8 ? words - i : 8;
    uint64_t acc = 0;
    for (size_t j = 0; j < k; j++) acc |= w[i + j];
    if (acc) return 0;
  }
  for (size_t i = words * 8; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

static napi_value map_file(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  int64_t length;
  if (!args(env, info, 2, argv) || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &length) != napi_ok || length <= 0)
    return usage(env, "map(fd, length): an open file and a positive length");
  struct stat st;
  if (fstat(fd, &st) != 0) return fail(env, "map: fstat", errno);
  if (length > st.st_size) return usage(env, "map: length is beyond the end of the file");
  void *p = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail(env, "map: mmap", errno);
  pthread_mutex_lock(&lock);
  int id = -1;
  for (int i = 0; i < SLOTS; i++)
    if (!slots[i].p) {
      slots[i] = (struct slot){ p, (size_t)length, 0, 0 };
      id = i;
      break;
    }
  pthread_mutex_unlock(&lock);
  if (id < 0) {
    munmap(p, (size_t)length);
    return fail(env, "map: too many mappings", EMFILE);
  }
  napi_value r;
  napi_create_int32(env, id, &r);
  return r;
}

static struct slot *take(int32_t id) {
  struct slot *s = NULL;
  pthread_mutex_lock(&lock);
  if (id >= 0 && id < SLOTS && slots[id].p && !slots[id].closing) {
    s = &slots[id];
    s->users++;
  }
  pthread_mutex_unlock(&lock);
  return s;
}

static void release(struct slot *s) {
  unsigned char *p = NULL;
  size_t len = 0;
  pthread_mutex_lock(&lock);
  if (--s->users == 0 && s->closing) {
    p = s->p;
    len = s->len;
    *s = (struct slot){ 0 };
  }
  pthread_mutex_unlock(&lock);
  if (p) munmap(p, len);
}

static napi_value unmap_file(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t id;
  if (!args(env, info, 1, argv) || napi_get_value_int32(env, argv[0], &id) != napi_ok) return usage(env, "unmap(id)");
  struct slot *s = take(id);
  if (s) {
    pthread_mutex_lock(&lock);
    s->closing = 1;
    pthread_mutex_unlock(&lock);
    release(s);
  }
  return NULL;
}

static napi_value hash_group(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int32_t id;
  int64_t offset, length, out_offset;
  if (!args(env, info, 5, argv) || napi_get_value_int32(env, argv[0], &id) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok || napi_get_value_int64(env, argv[4], &out_offset) != napi_ok || offset < 0 || length <= 0 ||
      out_offset < 0)
    return usage(env, "hashGroup(id, offset, length, out, outOffset): non-negative integers");
  void *out_data;
  size_t out_len;
  napi_typedarray_type type;
  napi_value ab;
  size_t byte_offset;
  if (napi_get_typedarray_info(env, argv[3], &type, &out_len, &out_data, &ab, &byte_offset) != napi_ok || type != napi_uint8_array ||
      (uint64_t)out_offset + 16 > out_len)
    return usage(env, "hashGroup: out must be a Uint8Array with 16 bytes at outOffset");
  struct slot *s = take(id);
  if (!s) return usage(env, "hashGroup: no such mapping");
  /* As the JavaScript path does: only a whole group can be "zero"; a short one (the mapping's
   * end) is hashed for what it holds, possibly nothing. */
  size_t n = (uint64_t)offset >= s->len ? 0 : (size_t)length < s->len - (size_t)offset ? (size_t)length : s->len - (size_t)offset;
  const unsigned char *p = n ? s->p + offset : (const unsigned char *)"";
  int zero = n == (size_t)length && all_zero(p, n);
  if (!zero) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, n));
    memcpy((unsigned char *)out_data + out_offset, c.digest, 16);
  }
  release(s);
  napi_value r;
  napi_get_boolean(env, zero, &r);
  return r;
}

napi_value ferry_tcp_info(napi_env env, napi_callback_info info); /* tcpinfo.c */

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "tcpInfo", NAPI_AUTO_LENGTH, ferry_tcp_info, NULL, &fn);
  napi_set_named_property(env, exports, "tcpInfo", fn);
  napi_create_function(env, "map", NAPI_AUTO_LENGTH, map_file, NULL, &fn);
  napi_set_named_property(env, exports, "map", fn);
  napi_create_function(env, "unmap", NAPI_AUTO_LENGTH, unmap_file, NULL, &fn);
  napi_set_named_property(env, exports, "unmap", fn);
  napi_create_function(env, "hashGroup", NAPI_AUTO_LENGTH, hash_group, NULL, &fn);
  napi_set_named_property(env, exports, "hashGroup", fn);
  return exports;
}
