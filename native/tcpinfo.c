/*
 * Why this file exists: the transport (src/transport/session.ts) stripes a migration's last
 * frames over many TCP connections, with parity. A frame written to a connection whose TCP is
 * recovering a lost segment waits behind that recovery (a round trip or more), and the sender
 * cannot see it from acknowledgements alone: the receiver rebuilds the frames already in flight
 * on it from parity and acknowledges them, so the connection looks as healthy as the others.
 * The kernel knows: getsockopt(TCP_INFO) says whether it is in loss recovery and how many of its
 * segments it holds for lost.
 *
 *   tcpInfo(fd) -> [caState, lost, retrans, unacked, rttUs] | null (not a TCP socket)
 *
 * caState is Linux's congestion-avoidance state: 0 open, 1 disorder, 2 CWR, 3 recovery, 4 loss.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <node_api.h>
#include <sys/socket.h>

napi_value ferry_tcp_info(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], r, v;
  int32_t fd = -1;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_get_null(env, &r);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) return r;
  struct tcp_info ti;
  socklen_t len = sizeof ti;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return r;
  uint32_t f[5] = {ti.tcpi_ca_state, ti.tcpi_lost, ti.tcpi_retrans, ti.tcpi_unacked, ti.tcpi_rtt};
  napi_create_array_with_length(env, 5, &r);
  for (uint32_t i = 0; i < 5; i++) {
    napi_create_uint32(env, f[i], &v);
    napi_set_element(env, r, i, v);
  }
  return r;
}
