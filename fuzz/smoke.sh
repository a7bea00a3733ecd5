#!/usr/bin/env bash
# The fuzz smoke (CI): builds every fuzz target, then runs each from its seeds
# (corpus/<target>) for GOFE_FUZZ_SECONDS seconds (default 30, at most 60), one after
# another, and fails on any crash, panic, leak, timeout or out-of-memory. What a run
# finds goes to artifacts/<target>/ (reproduce: target/<triple>/release/<target>
# <file>); what it grows from the seeds goes to work/<target>/, never into corpus/.
#
# Needs cargo-fuzz (tests/setup.sh installs it). cargo-fuzz asks for nightly features;
# RUSTC_BOOTSTRAP=1 lets this stable toolchain give them. GOFE_CARGO_LOCK=FILE runs the
# build under `flock FILE` (a machine whose builds take turns); the runs never are.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds=${GOFE_FUZZ_SECONDS:-30}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "fuzz/smoke.sh: GOFE_FUZZ_SECONDS=$seconds: expected a number of seconds" >&2
  exit 2
fi
[ "$seconds" -gt 60 ] && seconds=60
lock=()
[ -n "${GOFE_CARGO_LOCK:-}" ] && lock=(flock "$GOFE_CARGO_LOCK")

started=$(date +%s)
"${lock[@]}" cargo fetch --locked
# Release optimisations with debug assertions and overflow checks (cargo-fuzz's default;
# --release would turn the checks off) and AddressSanitizer; 16 codegen units build in
# about half the time of cargo-fuzz's 1, for a little speed of the fuzzers. long.sh
# builds the same way, so one build serves both. GOFE_FUZZ_BUILD=quick (CI) builds
# without optimisations or AddressSanitizer instead: it builds in a fraction of the
# time and still fails on every panic, hang and overflow; what it gives up is speed of
# execution (fewer inputs in the same seconds) and ASan's checks of the unsafe code in
# dependencies (ours forbids unsafe), which the long runs keep.
profile=release
build=(--codegen-units 16)
if [ "${GOFE_FUZZ_BUILD:-}" = quick ]; then
  profile=debug
  build=(--dev --sanitizer none)
fi
"${lock[@]}" cargo fuzz build "${build[@]}"
built=$(date +%s)
bin="target/$(rustc -vV | sed -n 's/^host: //p')/$profile"

failed=()
passed=0
for src in fuzz_targets/*.rs; do
  t=$(basename "$src" .rs)
  mkdir -p "work/$t" "artifacts/$t"
  echo "fuzz/smoke.sh: $t for ${seconds}s"
  # -timeout: one input taking this long is a hang (a quadratic parser, a loop).
  if ! "$bin/$t" "work/$t" "corpus/$t" \
      -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"work/$t.log" 2>&1; then
    failed+=("$t")
    tail -n 40 "work/$t.log" >&2
  else
    passed=$((passed + 1))
    grep -E '^#[0-9]+ +DONE|^Done [0-9]+ runs' "work/$t.log" | tail -n 2 | sed "s/^/  /"
  fi
done
ended=$(date +%s)
echo "fuzz/smoke.sh: build $((built - started))s, runs $((ended - built))s, total $((ended - started))s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/smoke.sh: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
else
  echo "fuzz/smoke.sh: every target ran ${seconds}s without a crash"
fi
echo "fuzz: $passed passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
