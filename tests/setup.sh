#!/usr/bin/env bash
# Installs what the tests need on Debian/Ubuntu: iproute2 and iptables (both backends)
# for the pods, curl and h2load (nghttp2-client) as real clients, promtool (Debian's
# prometheus package) to check the metrics exposition, kubernetes-validate for the
# manifests, etcd (Debian's etcd-server) for the registry's tests, protoc
# (protobuf-compiler, and libprotobuf-dev for its well-known types), which the etcd
# client's build needs for etcd's API; for the attack suite, slowhttptest and the Python
# h2 library (python3-h2, with hyperframe and hpack, which write HTTP/2 frame by frame);
# and cargo-fuzz for the fuzz smoke. The benchmarks also use haproxy and nginx when they
# are present, the shell ones valgrind (callgrind.sh) and perf (syscalls.sh, flame.sh),
# and pgo.sh rustup's llvm-tools (llvm-profdata): GOFE_SETUP_BENCH=1 installs them.
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
{ command -v iptables-nft >/dev/null && command -v iptables-legacy >/dev/null; } || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v promtool >/dev/null || need+=(prometheus)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, which etcd's API imports)
# are in libprotobuf-dev, only a recommendation of protobuf-compiler's.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v slowhttptest >/dev/null || need+=(slowhttptest)
if [ "${GOFE_SETUP_BENCH:-0}" = 1 ]; then
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v nginx >/dev/null || need+=(nginx-light)
  command -v valgrind >/dev/null || need+=(valgrind)
  command -v perf >/dev/null || need+=(linux-perf)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/setup.sh: need root to install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Python h2 library (hyperframe and hpack) for the HTTP/2 attacks, for whichever
# python3 is first on the PATH: Debian's python3-h2 where that is the system's, else PyPI.
if ! python3 -c 'import h2, hyperframe, hpack' 2>/dev/null; then
  if [ "$(command -v python3)" = /usr/bin/python3 ] && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-h2 >/dev/null
  fi
  python3 -c 'import h2, hyperframe, hpack' 2>/dev/null \
    || python3 -m pip install --quiet h2 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages h2
fi
# kubernetes-validate (PyPI) checks the manifests in k8s/ against the Kubernetes schemas.
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate
fi
if [ "${GOFE_SETUP_BENCH:-0}" = 1 ] && ! [ -x "$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/llvm-profdata" ]; then
  rustup component add llvm-tools
fi
# cargo-fuzz (crates.io) builds and runs fuzz/'s targets.
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked
fi
echo "tests/setup.sh: ip, iptables, curl, h2load, promtool, etcd, protoc, slowhttptest, python3-h2, kubernetes-validate and cargo-fuzz are installed"
