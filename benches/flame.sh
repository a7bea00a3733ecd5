#!/usr/bin/env bash
# A CPU flame graph (SVG) of gofe's two-hop HTTP/2 path, both sidecars in one graph:
#
#   h2load (HTTP/2, -c 4 -m 16) -> client sidecar (outbound listener, explicit proxy)
#     -> mTLS (certificates from a real `gofe identity --insecure-dev`) ->
#   server sidecar (inbound listener, GOFE_INBOUND_DIRECT_TARGET) -> nginx (h2c origin)
#
# Both sidecars run on CPU 0 (one worker thread each, as in benches/load.rs); h2load,
# nginx, the issuer and perf on CPU 1. After a warm-up, `perf record -e cpu-clock -F 999
# --call-graph dwarf` samples both sidecars for DURATION seconds of load; then
# perf script | inferno-collapse-perf | inferno-flamegraph (frames narrower than half a
# pixel left out: 300 KB instead of 3 MB). The root frames are
# `client-sidecar` and `server-sidecar`.
#
#   bash benches/flame.sh [GOFE_BINARY] [OUT.svg]   # defaults: target/release/gofe,
#                                                   #   benches/flame-two-hop-h2.svg
#
# Env: DURATION (default 10), CALL_GRAPH (default dwarf; `fp` for frame pointers, which
# Rust release builds mostly lack), KEEP=1 keeps the work directory (perf.data, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
gofe=$(realpath "${1:-target/release/gofe}")
out=$(realpath -m "${2:-benches/flame-two-hop-h2.svg}")
duration=${DURATION:-10}
call_graph=${CALL_GRAPH:-dwarf}
export PATH="$PATH:$HOME/.cargo/bin"
for tool in perf h2load nginx python3 taskset inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "benches/flame.sh: needs $tool (inferno: cargo install inferno --locked)" >&2; exit 1; }
done
[ -x "$gofe" ] || { echo "benches/flame.sh: no gofe binary at $gofe" >&2; exit 1; }
cpus=$(nproc)
if [ "$cpus" -ge 2 ]; then proxy_cpu=0; load_cpu=1; else proxy_cpu=0; load_cpu=0; fi
on() { local cpu=$1; shift; taskset -c "$cpu" "$@"; }

work=$(mktemp -d /tmp/gofe-flame.XXXXXX)
me=benches/flame.sh
# shellcheck source=benches/common.sh
. benches/common.sh
pids=()
perf_pid=
cleanup() {
  [ -n "$perf_pid" ] && kill -TERM "$perf_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  stop_origin
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
started=$(date +%s)

# The origin: nginx, HTTP/2 prior knowledge (the server sidecar speaks to the
# application what the client spoke), 32 bytes per answer.
start_origins taskset -c "$load_cpu"
origin=$(origin_for h2)

# The issuer: a trust anchor and `gofe identity` handing out certificates.
"$gofe" identity --bootstrap "$work/issuer" >"$work/bootstrap.log" 2>&1
echo bench >"$work/token"
issuer=$(port)
# (taskset directly, not through a shell function: in the background that would be a
# subshell, and $! its PID rather than the process's own.)
GOFE_LOG=warn taskset -c "$load_cpu" "$gofe" identity --issuer-dir "$work/issuer" --insecure-dev \
  --listen "127.0.0.1:$issuer" --admin-listen "127.0.0.1:$(port)" \
  </dev/null >"$work/issuer.log" 2>&1 &
pids+=($!)
wait_port "$issuer"

# sidecar NAME OUTBOUND INBOUND ADMIN
sidecar() {
  local name=$1 outbound=$2 inbound=$3 admin=$4
  env GOFE_OUTBOUND_LISTEN="127.0.0.1:$outbound" GOFE_INBOUND_LISTEN="127.0.0.1:$inbound" \
    GOFE_ADMIN_LISTEN="127.0.0.1:$admin" GOFE_INBOUND_DIRECT_TARGET="127.0.0.1:$origin" \
    GOFE_PROXY_UID="$(id -u)" GOFE_LOG=warn GOFE_WORKER_THREADS=1 \
    GOFE_IDENTITY_ADDR="127.0.0.1:$issuer" \
    GOFE_IDENTITY_NAME="spiffe://cluster.local/ns/bench/sa/$name" \
    GOFE_IDENTITY_TRUST_ANCHORS="$work/issuer/ca.crt" GOFE_IDENTITY_TOKEN_FILE="$work/token" \
    taskset -c "$proxy_cpu" "$gofe" proxy </dev/null >"$work/$name.log" 2>&1 &
  pids+=($!)
  eval "${name}_pid=$!"
}
server_in=$(port); server_admin=$(port)
client_out=$(port); client_admin=$(port)
sidecar server "$(port)" "$server_in" "$server_admin"
sidecar client "$client_out" "$(port)" "$client_admin"
wait_ready "$server_admin"
wait_ready "$client_admin"
# shellcheck disable=SC2154 # set by sidecar()
echo "client sidecar pid $client_pid, server sidecar pid $server_pid" >&2

load() {
  on "$load_cpu" h2load -c 4 -m 16 -H ":authority: 127.0.0.1:$server_in" "$@" \
    "http://127.0.0.1:$client_out/"
}
# Warm-up: connections, the mesh connection, pools.
load -n 5000 >"$work/warm-up.txt"
grep -q " 5000 succeeded, 0 failed, 0 errored" "$work/warm-up.txt" \
  || { echo "benches/flame.sh: warm-up requests failed: $(cat "$work/warm-up.txt")" >&2; exit 1; }

# -N: no copy of the binary into ~/.debug at every run.
taskset -c "$load_cpu" perf record -N -e cpu-clock -F 999 -g --call-graph "$call_graph" \
  -p "$client_pid,$server_pid" -o "$work/perf.data" >"$work/perf-record.log" 2>&1 &
perf_pid=$!
sleep 0.5
load -D "$duration" >"$work/load.txt"
# TERM, not INT: a script's background jobs ignore SIGINT. perf writes its data either way.
kill -TERM "$perf_pid"
wait "$perf_pid" || true
perf_pid=
grep -E "^finished in|^requests:|^status codes:" "$work/load.txt" >&2
grep -qE "^status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx" "$work/load.txt" \
  && grep -qE " 0 failed, 0 errored" "$work/load.txt" \
  || { echo "benches/flame.sh: requests failed under load: $(cat "$work/load.txt")" >&2; exit 1; }

# Every request went over mTLS between the sidecars (the client sidecar's metrics).
metrics=$(curl -fsS "http://127.0.0.1:$client_admin/metrics")
if ! grep -q '^gofe_requests_total{direction="outbound".*tls="true"' <<<"$metrics" \
  || grep -q '^gofe_requests_total{direction="outbound".*tls="false"' <<<"$metrics"; then
  echo "benches/flame.sh: not every request between the sidecars went over mTLS" >&2
  exit 1
fi

# Samples -> folded stacks, the root frame naming the sidecar -> SVG.
# (perf resolves inlined frames with addr2line from the line tables: a minute or two.)
perf script -i "$work/perf.data" -F comm,pid,tid,time,event,ip,sym,dso 2>"$work/perf-script.log" \
  | inferno-collapse-perf --pid \
  | sed -e "s/^[^;]*-$client_pid\([/;]\)/client-sidecar\1/" \
        -e "s/^[^;]*-$server_pid\([/;]\)/server-sidecar\1/" >"$work/folded.txt"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
inferno-flamegraph --minwidth 0.5 \
  --title "gofe two hops, HTTP/2, mTLS: client sidecar -> server sidecar ($(basename "$gofe"), $(date -u +%Y-%m-%d), tree $commit)" \
  --subtitle "h2load -c 4 -m 16 for ${duration}s; perf -e cpu-clock -F 999 --call-graph $call_graph; both sidecars on CPU $proxy_cpu, 1 worker thread each" \
  <"$work/folded.txt" >"$out"
# Samples per sidecar (at 999 Hz: about a millisecond of its CPU each).
awk '{split($1, f, ";"); t[f[1]] += $NF} END {for (k in t) printf "%s: %d samples\n", k, t[k]}' \
  "$work/folded.txt" >&2
grep -q "gofe_proxy" "$out" || echo "benches/flame.sh: warning: no gofe_proxy frames in $out (symbols?)" >&2
echo "wrote $out in $(( $(date +%s) - started )) s" >&2
