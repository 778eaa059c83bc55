#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets/*.rs, bodies in tests/src/fuzz.rs) with cargo-fuzz
# and libFuzzer, each from seeds made of the project's fixtures, and prints one table.
#
#   scripts/fuzz.sh [--seconds S | --runs N] [--sanitizer address|none] [TARGET ...]
#
# Default: every target for 20 seconds (CI runs this). `--runs 1000000` runs each target for
# that many executions (the counts in docs/RESULTS.md). A crash, a hang (20 s per input) or an
# allocation past 2 GiB stops the target, leaves the input under fuzz/artifacts/TARGET/ and
# makes the script fail; replay it with `cargo +nightly fuzz run TARGET FILE`, fix it, and add
# the file to tests/fuzz/TARGET/ (the regression test replays every file there).
# `--sanitizer none` builds without AddressSanitizer (into fuzz/target-none): coverage-guided
# only, several times faster, for long runs of targets whose code is safe Rust.
#
# Needs: the nightly toolchain (libFuzzer's coverage and AddressSanitizer flags are unstable;
# without nightly, the pinned toolchain with RUSTC_BOOTSTRAP=1), cargo-fuzz (installed here
# when missing), SmolLM2 prepared for the tokenizer
# target (models/smollm2-135m/prepare.sh). Delete fuzz/corpus to start again from the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=20
runs=""
sanitizer=address
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --sanitizer) sanitizer="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(onnx_import bundle_load tokenizer ir_text)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t (targets: ${all[*]})" >&2; exit 2; }
done

log() { echo "[fuzz $(date +%H:%M:%S)] $*"; }

# libFuzzer's coverage and sanitizer flags are unstable: nightly where it is installed, else the
# pinned toolchain with those flags unlocked (RUSTC_BOOTSTRAP=1; the same compiler, no download).
toolchain=nightly
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
  export RUSTC_BOOTSTRAP=1
  log "no nightly toolchain: using $toolchain with RUSTC_BOOTSTRAP=1"
fi
if ! cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo +"$toolchain" install cargo-fuzz --locked --quiet
fi
if [ ! -f models/smollm2-135m/tokenizer.json ] && [[ " ${targets[*]} " == *" tokenizer "* ]]; then
  echo "fuzz.sh: the tokenizer target needs SmolLM2: run bash models/smollm2-135m/prepare.sh" >&2
  exit 1
fi

# Seeds (small real inputs of each kind, so that mutations start from valid structure):
# ONNX op fixtures, a tiny language model as ONNX and compiled to bundles, prompts, and the
# IR text of every fixture (patch_tests::fuzz::write_seeds). libFuzzer adds what it finds.
if [ ! -d fuzz/corpus ]; then
  log "writing seed corpora under fuzz/corpus"
  cargo build --release --locked --quiet -p patch-tests --bin fuzz-seeds
  target/release/fuzz-seeds fuzz/corpus
fi
max_len() {
  case "$1" in
    onnx_import|bundle_load) echo 65536 ;;
    tokenizer) echo 1024 ;;
    ir_text) echo 32768 ;;
  esac
}

case "$sanitizer" in
  address) build=(-O) ;;
  none) build=(-O -s none --target-dir fuzz/target-none) ;;
  *) echo "fuzz.sh: --sanitizer is address or none, not $sanitizer" >&2; exit 2 ;;
esac
log "building the fuzz targets ($toolchain, sanitizer: $sanitizer)"
cargo +"$toolchain" fuzz build "${build[@]}" > fuzz/build-$sanitizer.log 2>&1 || { tail -30 fuzz/build-$sanitizer.log; exit 1; }

summary=()
failed=0
for t in "${targets[@]}"; do
  limit=(-max_total_time="$seconds")
  [ -n "$runs" ] && limit=(-runs="$runs")
  out="fuzz/$t.log"
  log "$t: ${runs:-$seconds s} from $(ls "fuzz/corpus/$t" | wc -l) corpus inputs (log: $out)"
  set +e
  cargo +"$toolchain" fuzz run "${build[@]}" "$t" "fuzz/corpus/$t" -- "${limit[@]}" \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=20 -max_len="$(max_len "$t")" \
    -print_final_stats=1 > "$out" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out" | grep -o '[0-9]*$' | tail -1)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$out" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1)
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  if [ $rc -eq 0 ]; then
    result=ok
  else
    failed=1
    result="FAILED (rc $rc): $(grep -m1 -o 'ERROR: libFuzzer: [a-z-]*\|SUMMARY: [A-Za-z]*: [a-z-]*\|panicked at [^ ]*' "$out" || echo see the log)"
    grep -m3 'Test unit written to\|artifact_prefix' "$out" || true
  fi
  summary+=("$(printf '%-12s %-9s %12s %8s %10s   %s' "$t" "$sanitizer" "${execs:-?}" "${secs:-?}" "$corpus" "$result")")
done

echo
printf '%-12s %-9s %12s %8s %10s   %s\n' target sanitizer executions seconds corpus result
printf '%s\n' "${summary[@]}"
[ $failed -eq 0 ] || { echo "fuzz.sh: a target failed; its input is under fuzz/artifacts/" >&2; exit 1; }
