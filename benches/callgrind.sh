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
# callgrind_annotate) in the work directory it prints, PROXIES (default "gofe haproxy")
# and PROTOCOLS (default "h1 h2") choose what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
gofe=$(realpath "${1:-target/release/gofe}")
n1=${N1:-2000}
n2=${N2:-12000}
for tool in valgrind h2load nginx; do
  command -v "$tool" >/dev/null || { echo "benches/callgrind.sh: needs $tool" >&2; exit 1; }
done
work=$(mktemp -d /tmp/gofe-callgrind.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "benches/callgrind.sh: nothing listens on $1" >&2
  exit 1
}

# The origin: HTTP/1.1 on one port, HTTP/2 (prior knowledge) on another; each proxy
# speaks to it what its client spoke, as gofe does.
origin=$(port)
origin2=$(port)
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<EOF
daemon on; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$origin; location / { return 200 "0123456789abcdef0123456789abcdef"; } }
  server { listen 127.0.0.1:$origin2 http2; location / { return 200 "0123456789abcdef0123456789abcdef"; } }
}
EOF
nginx -c "$work/nginx.conf"
wait_port "$origin"
wait_port "$origin2"
origin_for() { if [ "$1" = h2 ]; then echo "$origin2"; else echo "$origin"; fi; }

# Ir of the whole run of `cmd...` serving N requests of protocol P on port L.
measure() {
  local name=$1 proto=$2 n=$3 listen=$4; shift 4
  local out="$work/$name.$proto.$n.out"
  valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_port "$listen"
  local h2=()
  [ "$proto" = h2 ] && h2=(-m 16)
  [ "$proto" = h1 ] && h2=(--h1)
  # Warm-up (pools, buffers), then the measured requests.
  h2load "${h2[@]}" -n 500 -c 4 "http://127.0.0.1:$listen/" >/dev/null
  h2load "${h2[@]}" -n "$n" -c 4 "http://127.0.0.1:$listen/" >"$work/h2load.txt"
  grep -q " $n succeeded, 0 failed, 0 errored" "$work/h2load.txt" \
    || { echo "benches/callgrind.sh: requests failed: $(cat "$work/h2load.txt")" >&2; exit 1; }
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sed -n 's/^summary: //p;s/^totals: //p' "$out" | head -n 1
}

gofe_run() {
  local proto=$1 n=$2 listen admin
  listen=$(port); admin=$(port)
  measure gofe "$proto" "$n" "$listen" env \
    GOFE_INBOUND_LISTEN="127.0.0.1:$listen" GOFE_OUTBOUND_LISTEN="127.0.0.1:$(port)" \
    GOFE_ADMIN_LISTEN="127.0.0.1:$admin" GOFE_INBOUND_DIRECT_TARGET="127.0.0.1:$(origin_for "$proto")" \
    GOFE_IDENTITY_DISABLED=true GOFE_WORKER_THREADS=1 GOFE_LOG=warn \
    GOFE_PROXY_UID="$(id -u)" "$gofe" proxy
}

haproxy_run() {
  local proto=$1 n=$2 listen
  listen=$(port)
  local bind="bind 127.0.0.1:$listen" server="server o 127.0.0.1:$(origin_for "$proto")"
  if [ "$proto" = h2 ]; then bind="$bind proto h2"; server="$server proto h2"; fi
  cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  $bind
  default_backend b
backend b
  $server
EOF
  measure haproxy "$proto" "$n" "$listen" haproxy -f "$work/haproxy.cfg" -db
}

echo "# callgrind, one hop plaintext, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), N = $n1 and $n2"
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
[ "${KEEP:-0}" = 1 ] && echo "callgrind outputs kept in $work"
