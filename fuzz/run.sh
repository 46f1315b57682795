#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 60). Exits non-zero when a target
# finds a crash (the input is left in fuzz/artifacts/<target>/) or does not build.
#
#   fuzz/run.sh 60            # every target, one minute each
#   fuzz/run.sh 300 parser    # one target
#
# cargo fuzz needs nightly compiler options (-Zsanitizer=address and others); on a stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them, so no other toolchain is needed. cargo-fuzz itself
# is installed from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(parser request)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

start=$(date +%s)
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
for t in "${targets[@]}"; do
  if ! cargo fuzz build "$t" >"$build_log" 2>&1; then
    cat "$build_log"
    exit 1
  fi
done
echo "built in $(($(date +%s) - start)) s"

status=0
for t in "${targets[@]}"; do
  # New inputs go to a scratch corpus; the checked-in seeds stay as they are.
  work="target/corpus/$t"
  mkdir -p "$work" "artifacts/$t"
  log="target/fuzz-$t.log"
  echo "fuzzing $t for $seconds s (log: fuzz/$log)"
  if cargo fuzz run "$t" "$work" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || tail -n 3 "$log"
  else
    status=1
    echo "FAILED: $t found a crash or did not run (full output: fuzz/$log):"
    grep -E -A4 'panicked at|^==[0-9]+==ERROR|^SUMMARY' "$log" | head -n 40 || true
    grep -E 'Test unit written|^Error' "$log" || tail -n 20 "$log"
    echo "reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t artifacts/$t/<file>"
  fi
done
echo "total $(($(date +%s) - start)) s"
exit "$status"
