#!/usr/bin/env bash
# The long fuzz runs: every target for GOFE_FUZZ_LONG_SECONDS seconds of running time
# (default 3600), one after another, under `nice -n GOFE_FUZZ_NICE` (default 19),
# starting from the seeds (corpus/<target>) and whatever earlier runs grew
# (work/<target>). Each target's raw log goes to RESULTS/<target>.log; RESULTS/summary.md
# (rewritten after each target) holds executions, coverage and features as libFuzzer
# reports them, and crashes. RESULTS is GOFE_FUZZ_RESULTS, default results/.
#
#   nohup bash fuzz/long.sh >/tmp/gofe-fuzz-long.out 2>&1 &   # PID in /tmp/gofe-fuzz-long.pid
#
# Pausing (for a benchmark): the script makes itself a process group; stop and resume
# the whole group, `kill -STOP -- -PID` and `kill -CONT -- -PID`. Time stopped does not
# count as running time (a target whose hour a pause cut short is started again for the
# rest), and since libFuzzer's per-input timer runs on the wall clock, a "timeout"
# reported right after a pause is run again and dropped when it does not hang again.
#
# A real crash ends its target's run (the input is in artifacts/<target>/); the others
# still run. Builds the targets first if needed (GOFE_CARGO_LOCK as in smoke.sh).
set -uo pipefail
cd "$(dirname "$0")"
# Our own process group, so that one signal pauses the script and the fuzzer it runs.
if [ "$(ps -o pgid= $$ | tr -d ' ')" != "$$" ]; then
  exec setsid bash "$0" "$@"
fi
export RUSTC_BOOTSTRAP=1
budget=${GOFE_FUZZ_LONG_SECONDS:-3600}
niceness=${GOFE_FUZZ_NICE:-19}
results=${GOFE_FUZZ_RESULTS:-results}
timeout=60
echo $$ > "${GOFE_FUZZ_PIDFILE:-/tmp/gofe-fuzz-long.pid}"
mkdir -p "$results"
lock=()
[ -n "${GOFE_CARGO_LOCK:-}" ] && lock=(flock "$GOFE_CARGO_LOCK")
# As smoke.sh builds them.
if ! "${lock[@]}" cargo fuzz build --codegen-units 16 >"$results/build.log" 2>&1; then
  echo "fuzz/long.sh: the build failed: $results/build.log" >&2
  exit 1
fi
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"
all=()
for src in fuzz_targets/*.rs; do all+=("$(basename "$src" .rs)"); done
# Targets named on the command line run in that order; the summary keeps the rows of
# the others from earlier runs into the same RESULTS.
targets=("${all[@]}")
if [ $# -gt 0 ]; then targets=("$@"); fi
started_at=$(date -u +%Y-%m-%dT%H:%MZ)

# key=value from a target's results file.
get() { sed -n "s/^$2=//p" "$results/$1.result" 2>/dev/null | tail -n 1; }

summary() {
  {
    echo "# Fuzzing: each target for $budget s"
    echo
    echo "Last started $started_at (${targets[*]}) on $(nproc) CPUs ($(uname -m)), \`nice -n $niceness\`, each target for"
    echo "$budget s of running time: \`bash fuzz/long.sh\` ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))."
    echo "Coverage (cov) and features (ft) as libFuzzer reports them at the end of the run;"
    echo "corpus = inputs kept (seeds and grown). Crashes: confirmed by running the input again."
    echo
    echo "| target | running time | executions | exec/s | cov | ft | corpus | peak RSS | crashes | notes |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for t in "${all[@]}"; do
      if [ -f "$results/$t.result" ]; then
        local active execs
        active=$(get "$t" active); execs=$(get "$t" execs)
        echo "| $t | ${active}s | $execs | $(( execs / (active > 0 ? active : 1) )) | $(get "$t" cov) | $(get "$t" ft) | $(get "$t" corpus) | $(get "$t" rss) MB | $(get "$t" crashes) | $(get "$t" notes) |"
      else
        echo "| $t | (not run yet) | | | | | | | | |"
      fi
    done
  } >"$results/summary.md"
}

run_target() {
  local t=$1 active=0 execs=0 crashes=0 notes="" idle=0
  local log="$results/$t.log"
  : >"$log"
  mkdir -p "work/$t" "artifacts/$t"
  while [ $((budget - active)) -gt 5 ]; do
    local remaining=$((budget - active)) seg="$results/$t.segment.log"
    local seg_start last now gap paused=0 state fpid rc
    seg_start=$(date +%s)
    nice -n "$niceness" "$bin/$t" "work/$t" "corpus/$t" -max_total_time="$remaining" \
      -timeout=$timeout -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" \
      -print_final_stats=1 >"$seg" 2>&1 &
    fpid=$!
    last=$seg_start
    while kill -0 "$fpid" 2>/dev/null; do
      sleep 2
      now=$(date +%s)
      gap=$((now - last - 2))
      # The group was stopped: the clock jumped while this loop slept.
      [ "$gap" -gt 3 ] && paused=$((paused + gap))
      # Only the fuzzer was stopped.
      state=$(awk '{print $3}' "/proc/$fpid/stat" 2>/dev/null || echo X)
      [ "$state" = T ] && paused=$((paused + 2))
      last=$now
    done
    wait "$fpid"; rc=$?
    cat "$seg" >>"$log"
    local ran=$(( $(date +%s) - seg_start - paused ))
    [ "$ran" -lt 0 ] && ran=0
    active=$((active + ran))
    local n
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$seg" | tail -n 1)
    [ -z "$n" ] && n=$(grep -oE '^#[0-9]+' "$seg" | tail -n 1 | tr -d '#')
    execs=$((execs + ${n:-0}))
    if [ "$paused" -gt 0 ]; then notes="${notes:+$notes; }paused ${paused}s"; fi
    if [ "$rc" -ne 0 ]; then
      local found real=()
      found=$(find "artifacts/$t" -type f -newermt "@$seg_start" 2>/dev/null)
      for f in $found; do
        case "$(basename "$f")" in
          timeout-*)
            # Wall-clock timers and a pause: a hang only if it hangs again.
            if nice -n "$niceness" "$bin/$t" -timeout=$timeout "$f" >/dev/null 2>&1; then
              notes="${notes:+$notes; }timeout after a pause dropped"
              rm -f "$f"
            else
              real+=("$f")
            fi ;;
          *) real+=("$f") ;;
        esac
      done
      if [ ${#real[@]} -gt 0 ] || [ -z "$found" ]; then
        crashes=$((crashes + ${#real[@]}))
        [ -z "$found" ] && notes="${notes:+$notes; }exit $rc without an input"
        [ ${#real[@]} -gt 0 ] && notes="${notes:+$notes; }${real[*]}"
        break
      fi
    fi
    # A run that ends at once, again and again, is not going to use its hour.
    if [ "$ran" -lt 5 ]; then
      idle=$((idle + 1))
      [ "$idle" -ge 3 ] && { notes="${notes:+$notes; }stopped: runs ended at once"; break; }
    fi
  done
  rm -f "$results/$t.segment.log"
  local status
  status=$(grep -E 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  {
    echo "active=$active"
    echo "execs=$execs"
    echo "cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$status")"
    echo "ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$status")"
    echo "corpus=$(sed -nE 's/.*corp: ([0-9]+).*/\1/p' <<<"$status")"
    echo "rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | sort -n | tail -n 1)"
    echo "crashes=$crashes"
    echo "notes=$notes"
  } >"$results/$t.result"
}

for t in "${targets[@]}"; do rm -f "$results/$t.result"; done
summary
for t in "${targets[@]}"; do
  echo "fuzz/long.sh: $t, $(date -u +%H:%M:%SZ)"
  run_target "$t"
  summary
done
echo "fuzz/long.sh: done, $(date -u +%H:%M:%SZ); $results/summary.md"
