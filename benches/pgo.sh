#!/usr/bin/env bash
# A profile-guided (PGO) release build of gofe, trained on the shapes the benchmarks
# measure. Three steps:
#
#   1. build gofe instrumented (-Cprofile-generate) in target/pgo-generate;
#   2. train it: h2load through the inbound listener, the outbound listener (explicit
#      proxy) and two sidecars over mTLS (certificates from a real `gofe identity`),
#      HTTP/1.1 and HTTP/2 each, against nginx; GETs, and POSTs of a 4 KiB body;
#      through the outbound listener also to destinations with ten routes, a sticky
#      split and a rate limit (so that their code is not taken for cold); the sidecars
#      are stopped with SIGTERM so that they drain and write their profiles;
#   3. merge the profiles (rustup's llvm-tools: llvm-profdata of rustc's own LLVM) into
#      benches/pgo/gofe.profdata.xz, and build gofe with it (-Cprofile-use) in
#      target/pgo: target/pgo/x86_64-unknown-linux-gnu/release/gofe.
#
#   bash benches/pgo.sh            # all three steps
#   bash benches/pgo.sh --use      # step 3's build only, from the profile in the tree
#
# The profile is kept in the tree, compressed, so that a PGO build needs no training
# run (and no nginx or h2load). A profile older than the code still works: functions
# whose code changed since are built without it (LLVM's warnings for them are turned
# off), the rest with it. Train again when the request path changes much: BENCHMARKS.md
# says what a fresh profile gives. The profile fits this target and this toolchain
# only: with another --target (musl, say) or another rustc, cargo names every symbol
# differently, and the profile, keyed by those names, applies to nothing. The image
# (k8s/Dockerfile) builds with `--use`, on the toolchain it pins.
set -euo pipefail
cd "$(dirname "$0")/.."
me=benches/pgo.sh
triple=x86_64-unknown-linux-gnu
profile=benches/pgo/gofe.profdata.xz
# The rustc that trained the profile (`rustc -V`): the profile is keyed by symbol names,
# which carry a hash of the compiler's version, so no other rustc can use it.
trained=benches/pgo/rustc.txt
sysroot=$(rustc --print sysroot)
profdata="$sysroot/lib/rustlib/$triple/bin/llvm-profdata"
cargo=${PGO_CARGO:-cargo}

use_profile() {
  [ -f "$profile" ] || { echo "$me: no profile at $profile (run $me without --use)" >&2; exit 1; }
  # Another rustc would build a binary the profile applies nothing to, without a word
  # from LLVM: refused (PGO_ANY_RUSTC=1 builds anyway).
  if [ -f "$trained" ] && [ "$(rustc -V)" != "$(cat "$trained")" ] && [ "${PGO_ANY_RUSTC:-0}" != 1 ]; then
    echo "$me: $profile was trained with $(cat "$trained"), this is $(rustc -V): its symbol names differ, so the profile would apply to nothing; use that toolchain, or train again (bash $me)" >&2
    exit 1
  fi
  # Named by its content: cargo rebuilds when RUSTFLAGS change, not when a file they
  # name does.
  local plain
  mkdir -p target/pgo
  plain=$(realpath "target/pgo/gofe-$(sha256sum "$profile" | cut -c1-16).profdata")
  [ -f "$plain" ] || xz -dc "$profile" >"$plain"
  # --target: the flags then reach gofe's crates only, not build scripts or proc macros.
  RUSTFLAGS="-Cprofile-use=$plain -Cllvm-args=-no-pgo-warn-mismatch" \
    $cargo build --release --locked --bin gofe --target "$triple" --target-dir target/pgo
  echo "$me: built target/pgo/$triple/release/gofe with $profile" >&2
}

if [ "${1:-}" = --use ]; then
  use_profile
  exit 0
fi

[ -x "$profdata" ] || { echo "$me: needs llvm-profdata: rustup component add llvm-tools" >&2; exit 1; }
for tool in h2load nginx curl xz; do
  command -v "$tool" >/dev/null || { echo "$me: needs $tool" >&2; exit 1; }
done
work=$(mktemp -d /tmp/gofe-pgo.XXXXXX)
# shellcheck source=benches/common.sh
. benches/common.sh
trap cleanup EXIT

# 1. Instrumented. (The profiles' directory is fixed: in RUSTFLAGS, a new one each run
# would rebuild everything each run.)
profraw=$(realpath -m target/pgo-generate/profraw)
RUSTFLAGS="-Cprofile-generate=$profraw" \
  $cargo build --release --locked --bin gofe --target "$triple" --target-dir target/pgo-generate
gofe=$(realpath "target/pgo-generate/$triple/release/gofe")
rm -rf "$profraw"

# 2. Training.
start_origins
"$gofe" identity --bootstrap "$work/issuer" >"$work/bootstrap.log" 2>&1
echo train >"$work/token"
issuer=$(port)
GOFE_LOG=warn "$gofe" identity --issuer-dir "$work/issuer" --insecure-dev \
  --listen "127.0.0.1:$issuer" --admin-listen "127.0.0.1:$(port)" \
  </dev/null >"$work/issuer.log" 2>&1 &
pids+=($!)
issuer_pid=$!
wait_port "$issuer"

# sidecar NAME ORIGIN: a sidecar whose inbound listener forwards to ORIGIN; its ports
# are in NAME_out, NAME_in and NAME_admin, its pid in NAME_pid.
sidecar() {
  local name=$1 to=$2 out inb admin
  out=$(port) inb=$(port) admin=$(port)
  env GOFE_OUTBOUND_LISTEN="127.0.0.1:$out" GOFE_INBOUND_LISTEN="127.0.0.1:$inb" \
    GOFE_DISCOVERY="file:$work/destinations-$to.yaml" \
    GOFE_ADMIN_LISTEN="127.0.0.1:$admin" GOFE_INBOUND_DIRECT_TARGET="127.0.0.1:$to" \
    GOFE_PROXY_UID="$(id -u)" GOFE_LOG=warn GOFE_WORKER_THREADS=1 \
    GOFE_IDENTITY_ADDR="127.0.0.1:$issuer" \
    GOFE_IDENTITY_NAME="spiffe://cluster.local/ns/train/sa/$name" \
    GOFE_IDENTITY_TRUST_ANCHORS="$work/issuer/ca.crt" GOFE_IDENTITY_TOKEN_FILE="$work/token" \
    "$gofe" proxy </dev/null >"$work/$name.log" 2>&1 &
  pids+=($!)
  eval "${name}_pid=$! ${name}_out=$out ${name}_in=$inb ${name}_admin=$admin"
  wait_ready "$admin"
}

# destinations ORIGIN: the client sidecar's discovery file, its destinations all served
# by ORIGIN.
destinations() {
  local to=$1
  cat >"$work/destinations-$to.yaml" <<YAML
destinations:
  - name: v1.train:80
    endpoints: [{address: "127.0.0.1:$to"}]
  - name: v2.train:80
    endpoints: [{address: "127.0.0.1:$to"}]
  - name: routed.train:80
    endpoints: [{address: "127.0.0.1:$to"}]
    policy:
      routes:
        - {name: shop, match: {path: {prefix: /shop}}}
        - {name: cart, match: {path: {prefix: /shop/cart}}}
        - {name: cart-exact, match: {path: {exact: /shop/cart}}}
        - {name: items, match: {path: {regex: "/shop/items/[0-9]+"}}}
        - {name: cart-post, match: {path: {prefix: /shop/cart}, method: POST}}
        - {name: gold, match: {path: {prefix: /shop/cart}, headers: {x-tier: {exact: gold}}}}
        - {name: beta, match: {path: {prefix: /shop/cart}, headers: {x-tier: {regex: "gold|silver"}, x-beta: {present: true}}}}
        - {name: debug, match: {path: {prefix: /shop/cart}, query: {debug: {exact: "1"}}}}
        - {name: api, match: {path: {prefix: /api}, headers: {x-user: {present: true}}}}
        - {name: root, match: {path: {prefix: /}}}
  - name: split.train:80
    endpoints: [{address: "127.0.0.1:$to"}]
    policy:
      routes:
        - name: canary
          backends: [{destination: v1.train:80, weight: 90}, {destination: v2.train:80, weight: 10}]
          sticky: {cookie: gofe-sticky}
  - name: limited.train:80
    endpoints: [{address: "127.0.0.1:$to"}]
    policy:
      rate_limit: {requests_per_second: 1e9, burst: 1000000}
YAML
}
head -c 4096 /dev/urandom >"$work/body"

# load PROTO N URL AUTHORITY [H2LOAD ARGS...]: N requests, 4 connections (16 streams
# each on HTTP/2), every one answered 2xx.
load() {
  local proto=$1 n=$2 url=$3 authority=$4 flags=(-c 4)
  shift 4
  if [ "$proto" = h1 ]; then flags+=(--h1); else flags+=(-m 16); fi
  echo "$me: $proto $url $authority $*" >&2
  h2load "${flags[@]}" -n "$n" -H ":authority: $authority" "$@" "$url" >"$work/load.txt"
  if ! grep -q " $n succeeded, 0 failed, 0 errored" "$work/load.txt" \
    || ! grep -qE "^status codes: $n 2xx" "$work/load.txt"; then
    echo "$me: training requests failed: $(grep -E '^requests|^status' "$work/load.txt")" >&2
    for s in client server; do curl -fsS "http://127.0.0.1:$(eval echo "\$${s}_admin")/metrics" >"$work/$s.metrics" || true; done
    KEEP=1
    exit 1
  fi
}

# shellcheck disable=SC2154 # set by sidecar()
for proto in h1 h2; do
  to=$(origin_for "$proto")
  destinations "$to"
  sidecar server "$to"
  sidecar client "$to"
  load "$proto" 100000 "http://127.0.0.1:$server_in/" "127.0.0.1:$server_in"   # inbound
  load "$proto" 100000 "http://127.0.0.1:$client_out/" "127.0.0.1:$to"         # outbound
  load "$proto" 100000 "http://127.0.0.1:$client_out/" "127.0.0.1:$server_in"  # two hops
  load "$proto" 20000 "http://127.0.0.1:$client_out/shop/cart/1?debug=1" routed.train:80 \
    -H "x-tier: gold"
  load "$proto" 20000 "http://127.0.0.1:$client_out/" split.train:80 \
    -H "cookie: gofe-sticky=user-42"
  load "$proto" 20000 "http://127.0.0.1:$client_out/" limited.train:80
  # POSTs, to where the origin reads their bodies (benches/common.sh).
  post=(-d "$work/body")
  load "$proto" 20000 "http://127.0.0.1:$server_in/read-body" "127.0.0.1:$server_in" "${post[@]}"
  load "$proto" 20000 "http://127.0.0.1:$client_out/read-body" "127.0.0.1:$to" "${post[@]}"
  load "$proto" 20000 "http://127.0.0.1:$client_out/read-body" "127.0.0.1:$server_in" "${post[@]}"
  for p in $client_pid $server_pid; do kill -TERM "$p"; done
  for p in $client_pid $server_pid; do wait "$p" || true; done
done
kill -TERM "$issuer_pid"
wait "$issuer_pid" || true
pids=()

# 3. The profile, and the build that uses it.
ls "$profraw"/*.profraw >/dev/null
mkdir -p benches/pgo
"$profdata" merge -o "$work/gofe.profdata" "$profraw"/*.profraw
xz -9 -c "$work/gofe.profdata" >"$profile"
rustc -V >"$trained"
echo "$me: wrote $profile ($(du -h "$profile" | cut -f1)) from $(ls "$profraw" | wc -l) files" >&2
use_profile
