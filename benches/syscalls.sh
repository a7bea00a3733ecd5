#!/usr/bin/env bash
# System calls per request, counted by perf's syscall tracepoints on the proxy's
# process (all its threads): one hop, plaintext, a client (h2load) -> the proxy -> an
# origin (nginx answering 32 bytes), HTTP/1.1 keep-alive (4 connections) or HTTP/2
# prior knowledge (4 connections x 16 streams), the same shape as benches/callgrind.sh.
# HAProxy is counted the same way when it is installed. Counts, not times: the figure
# does not move with the machine's load.
#
#   bash benches/syscalls.sh [GOFE_BINARY]       # default target/release/gofe
#
# Env: N (default 20000) requests counted after a 2,000-request warm-up; PROXIES
# (default "gofe haproxy") and PROTOCOLS (default "h1 h2") choose what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
gofe=$(realpath "${1:-target/release/gofe}")
n=${N:-20000}
for tool in perf h2load nginx python3; do
  command -v "$tool" >/dev/null || { echo "benches/syscalls.sh: needs $tool" >&2; exit 1; }
done
perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1 \
  || { echo "benches/syscalls.sh: perf cannot count syscall tracepoints here (root? tracefs?)" >&2; exit 1; }
work=$(mktemp -d /tmp/gofe-syscalls.XXXXXX)
me=benches/syscalls.sh
# shellcheck source=benches/common.sh
. benches/common.sh
trap cleanup EXIT

start_origins

events=(raw_syscalls:sys_enter syscalls:sys_enter_epoll_wait syscalls:sys_enter_recvfrom
  syscalls:sys_enter_read syscalls:sys_enter_writev syscalls:sys_enter_sendto
  syscalls:sys_enter_write)

# Counts of `events` per request while the process PID serves N requests of protocol P
# on port L, as "total epoll_wait recv+read writes" per request.
count() {
  local proto=$1 listen=$2 pid=$3
  local flags=(--h1)
  [ "$proto" = h2 ] && flags=(-m 16)
  h2load "${flags[@]}" -n 2000 -c 4 "http://127.0.0.1:$listen/" >/dev/null
  local args=()
  for e in "${events[@]}"; do args+=(-e "$e"); done
  perf stat -x, "${args[@]}" -p "$pid" -o "$work/perf.txt" &
  local perf_pid=$!
  sleep 0.5
  h2load "${flags[@]}" -n "$n" -c 4 "http://127.0.0.1:$listen/" >"$work/h2load.txt"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  grep -q " $n succeeded, 0 failed, 0 errored" "$work/h2load.txt" \
    || { echo "benches/syscalls.sh: requests failed: $(cat "$work/h2load.txt")" >&2; exit 1; }
  python3 - "$work/perf.txt" "$n" <<'PY'
import sys
counts = {}
for line in open(sys.argv[1]):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        counts[parts[2].split(":")[-1]] = float(parts[0])
n = float(sys.argv[2])
g = lambda *names: sum(counts.get(k, 0.0) for k in names) / n
print(f"{g('sys_enter'):.2f} | {g('sys_enter_epoll_wait'):.2f} | "
      f"{g('sys_enter_recvfrom', 'sys_enter_read'):.2f} | "
      f"{g('sys_enter_writev', 'sys_enter_sendto', 'sys_enter_write'):.2f}")
PY
}

# Runs `cmd...`, a proxy listening on LISTEN, counts its system calls serving protocol
# P, and stops it.
run_counted() {
  local proto=$1 listen=$2 log=$3
  shift 3
  "$@" >"$log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_port "$listen"
  count "$proto" "$listen" "$pid"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

gofe_run() {
  local proto=$1 listen admin
  listen=$(port); admin=$(port)
  run_counted "$proto" "$listen" "$work/gofe.log" env \
    GOFE_INBOUND_LISTEN="127.0.0.1:$listen" GOFE_OUTBOUND_LISTEN="127.0.0.1:$(port)" \
    GOFE_ADMIN_LISTEN="127.0.0.1:$admin" GOFE_INBOUND_DIRECT_TARGET="127.0.0.1:$(origin_for "$proto")" \
    GOFE_IDENTITY_DISABLED=true GOFE_WORKER_THREADS=1 GOFE_LOG=warn \
    GOFE_PROXY_UID="$(id -u)" "$gofe" proxy
}

haproxy_run() {
  local proto=$1 listen
  listen=$(port)
  haproxy_config "$work/haproxy.cfg" "$proto" "$listen" "$(origin_for "$proto")"
  run_counted "$proto" "$listen" "$work/haproxy.log" haproxy -f "$work/haproxy.cfg" -db
}

echo "# syscalls per request, one hop plaintext, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), N = $n"
echo "| proxy | protocol | all | epoll_wait | reads (recvfrom, read) | writes (writev, sendto, write) |"
echo "|---|---|---:|---:|---:|---:|"
for proto in ${PROTOCOLS:-h1 h2}; do
  for who in ${PROXIES:-gofe haproxy}; do
    [ "$who" = haproxy ] && ! command -v haproxy >/dev/null && continue
    echo "| $who | $proto | $("${who}_run" "$proto") |"
  done
done
