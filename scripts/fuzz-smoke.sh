#!/usr/bin/env bash
# Fuzz smoke: build the cargo-fuzz targets in fuzz/ and run each one briefly; exit 1 if any
# target crashes (the reproducer is left in fuzz/artifacts/<target>/).
#   ./scripts/fuzz-smoke.sh                          # every target, 20 s each
#   FUZZ_SECONDS=300 ./scripts/fuzz-smoke.sh udp_mapping
# No root needed. cargo-fuzz needs nightly rustc features: on a stable toolchain they are
# enabled with RUSTC_BOOTSTRAP=1 (set here). A cold build of the targets takes a few minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz (cargo install cargo-fuzz)" >&2
  cargo install --locked cargo-fuzz
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

# -a: debug assertions and overflow checks on, as in the long runs. A build error fails here.
cargo fuzz build -a

failed=()
for t in "${targets[@]}"; do
  log=$(mktemp)
  if cargo fuzz run -a "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "fuzz-smoke: $t ok: ${runs:-?} runs, ${rate:-?}/s, ${cov:-cov: ?}"
  else
    echo "fuzz-smoke: $t FAILED; the end of its log:" >&2
    grep -E -A20 "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | head -40 >&2 || tail -40 "$log" >&2
    grep -E "^Failing input|artifacts/" "$log" | head -3 >&2 || true
    failed+=("$t")
  fi
  rm -f "$log"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-smoke: crashed: ${failed[*]} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET artifacts/TARGET/crash-…)" >&2
  exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} targets ran ${seconds} s without a crash"
