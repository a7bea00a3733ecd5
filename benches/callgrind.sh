#!/usr/bin/env bash
# Instructions per request, counted by callgrind: deterministic where the load benchmark's
# CPU times move by 10-25% between runs on a shared VM. One hop, plaintext: a client
# (h2load) -> the proxy -> an origin (nginx answering 32 bytes), HTTP/1.1 keep-alive or
# HTTP/2 prior knowledge. The proxy runs under callgrind twice, for N1 and N2 requests
# after the same warm-up; (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one request
# without start-up and warm-up. HAProxy is measured the same way when it is installed.
#
#   bash benches/callgrind.sh [GOFE_BINARY]       # default target/release/gofe
#
# Env: N1 (default 2000), N2 (default 12000), KEEP=1 keeps the callgrind outputs (for
# callgrind_annotate, benches/callgrind_by_code.py) in the work directory it prints,
# PROXIES (default "gofe haproxy") and PROTOCOLS (default "h1 h2") choose what is
# measured. GOFE_LISTENER=outbound measures gofe's outbound listener as an explicit
# proxy (the client names the origin as its authority; the destination's whole stack:
# retries, balancer, per-try timeout) instead of the inbound one. LOAD_ARGS adds h2load
# arguments for another request shape (`-d FILE` POSTs FILE as each request's body,
# `-H name:value` adds a field), LOAD_PATH another path (default `/`; under /read-body the
# origin reads request bodies, see benches/common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
gofe=$(realpath "${1:-target/release/gofe}")
n1=${N1:-2000}
n2=${N2:-12000}
for tool in valgrind h2load nginx; do
  command -v "$tool" >/dev/null || { echo "benches/callgrind.sh: needs $tool" >&2; exit 1; }
done
work=$(mktemp -d /tmp/gofe-callgrind.XXXXXX)
me=benches/callgrind.sh
# shellcheck source=benches/common.sh
. benches/common.sh
trap cleanup EXIT

# The origin: HTTP/1.1 on one port, HTTP/2 (prior knowledge) on another.
start_origins

# Ir of the whole run of `cmd...` serving N requests of protocol P on port L.
measure() {
  local name=$1 proto=$2 n=$3 listen=$4 authority=$5; shift 5
  local out="$work/$name.$proto.$n.out"
  valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_port "$listen"
  local h2=()
  [ "$proto" = h2 ] && h2=(-m 16)
  [ "$proto" = h1 ] && h2=(--h1)
  [ -n "$authority" ] && h2+=(-H ":authority: $authority")
  # shellcheck disable=SC2206 # LOAD_ARGS is split into words on purpose
  h2+=(${LOAD_ARGS:-})
  # Warm-up (pools, buffers), then the measured requests.
  h2load "${h2[@]}" -n 500 -c 4 "http://127.0.0.1:$listen${LOAD_PATH:-/}" >/dev/null
  h2load "${h2[@]}" -n "$n" -c 4 "http://127.0.0.1:$listen${LOAD_PATH:-/}" >"$work/h2load.txt"
  grep -q " $n succeeded, 0 failed, 0 errored" "$work/h2load.txt" \
    || { echo "benches/callgrind.sh: requests failed: $(cat "$work/h2load.txt")" >&2; exit 1; }
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sed -n 's/^summary: //p;s/^totals: //p' "$out" | head -n 1
}

gofe_run() {
  local proto=$1 n=$2 listen admin inbound outbound authority=
  listen=$(port); admin=$(port)
  if [ "${GOFE_LISTENER:-inbound}" = outbound ]; then
    inbound=$(port); outbound=$listen; authority="127.0.0.1:$(origin_for "$proto")"
  else
    inbound=$listen; outbound=$(port)
  fi
  measure gofe "$proto" "$n" "$listen" "$authority" env \
    GOFE_INBOUND_LISTEN="127.0.0.1:$inbound" GOFE_OUTBOUND_LISTEN="127.0.0.1:$outbound" \
    GOFE_ADMIN_LISTEN="127.0.0.1:$admin" GOFE_INBOUND_DIRECT_TARGET="127.0.0.1:$(origin_for "$proto")" \
    GOFE_IDENTITY_DISABLED=true GOFE_WORKER_THREADS=1 GOFE_LOG=warn \
    GOFE_PROXY_UID="$(id -u)" "$gofe" proxy
}

haproxy_run() {
  local proto=$1 n=$2 listen
  listen=$(port)
  haproxy_config "$work/haproxy.cfg" "$proto" "$listen" "$(origin_for "$proto")"
  measure haproxy "$proto" "$n" "$listen" "" haproxy -f "$work/haproxy.cfg" -db
}

echo "# callgrind, one hop plaintext (gofe's ${GOFE_LISTENER:-inbound} listener), $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), N = $n1 and $n2"
echo "| proxy | protocol | instructions per request |"
echo "|---|---|---:|"
for proto in ${PROTOCOLS:-h1 h2}; do
  for who in ${PROXIES:-gofe haproxy}; do
    [ "$who" = haproxy ] && ! command -v haproxy >/dev/null && continue
    a=$("${who}_run" "$proto" "$n1")
    b=$("${who}_run" "$proto" "$n2")
    per=$(( (b - a) / (n2 - n1) ))
    echo "| $who | $proto | $per |"
  done
done
