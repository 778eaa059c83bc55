#!/usr/bin/env bash
# Perplexity of SmolLM2-135M under every mask method and sparsity, as in docs/RESULTS.md.
#
#   bash benches/sparsity_sweep.sh [OUT_DIR] [EVAL_TOKENS] [CALIB_SAMPLES]
#
# Environment: SPARSITIES (default "0.25 0.35 0.45 0.5"), METHODS (default "patch patch-masks
# patch-matrix-update wanda sparsegpt"; patch is the default `--method patch`: block-wise
# learning with the weight update; patch-masks adds `--keep-weights`; patch-prior is
# `--blockwise-steps 0` (the sequential OBS prior alone); patch-matrix-update is the matrix-wise
# PATCH-Tile with SparseGPT's update (`--matrix-wise`), patch-matrix the same without the update;
# patch-joint-update is `--matrix-wise --joint-steps $JOINT_STEPS` (default 100)), DENSE=0 skips
# the dense row, KEEP=0 deletes each bundle once evaluated, THREADS (default 2). CALIB_SAMPLES
# defaults to 64.
#
# Needs `cargo build --release` and both prepare.sh scripts. Calibration statistics are
# computed once (OUT_DIR/calib.bin) and reused by every compile. Prints one markdown row per
# bundle: method, target and achieved sparsity, perplexity on the first EVAL_TOKENS tokens of
# the Brown evaluation split in 512-token windows, compile seconds (masks + packing, the shared
# calibration excluded), bundle size.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-sweep}"
TOKENS="${2:-100000}"
SAMPLES="${3:-64}"
MODEL=models/smollm2-135m/model_with_past.onnx
TEXT=models/brown/build/eval.txt
mkdir -p "$OUT"
BIN="${BIN:-target/release}"
THREADS="${THREADS:-2}"

row() { # method sparsity bundle seconds
  local ppl size achieved
  ppl=$("$BIN/patchrt" eval "$3" --text "$TEXT" --seq 512 --tokens "$TOKENS" --threads "$THREADS" --no-verify 2>/dev/null | awk '/^perplexity/ {print $2}')
  size=$(stat -c %s "$3")
  achieved=$(grep -o '"achieved_sparsity":[0-9.e-]*' "$OUT/$1-$2.log" 2>/dev/null | head -1 | cut -d: -f2 || true)
  printf '| %s | %s | %s | %s | %s | %.0f MB |\n' "$1" "$2" "${achieved:--}" "$ppl" "$4" "$(echo "$size / 1000000" | bc -l)"
}

echo "| method | target sparsity | achieved | perplexity ($TOKENS tokens) | compile s | bundle |"
echo "|---|---|---|---|---|---|"
if [ "${DENSE:-1}" != 0 ]; then
  "$BIN/patchc" compile "$MODEL" -o "$OUT/dense.patch" 2>/dev/null
  row dense 0 "$OUT/dense.patch" -
fi
for s in ${SPARSITIES:-0.25 0.35 0.45 0.5}; do
  for m in ${METHODS:-patch patch-masks patch-matrix-update wanda sparsegpt}; do
    b="$OUT/$m-$s.patch"
    args=(--method "$m")
    case "$m" in
      patch-masks) args=(--method patch --keep-weights) ;;
      patch-prior) args=(--method patch --blockwise-steps 0) ;;
      patch-matrix) args=(--method patch --matrix-wise --keep-weights) ;;
      patch-matrix-update) args=(--method patch --matrix-wise) ;;
      patch-joint-update) args=(--method patch --matrix-wise --joint-steps "${JOINT_STEPS:-100}") ;;
    esac
    start=$(date +%s.%N)
    "$BIN/patchc" compile "$MODEL" -o "$b" --sparsity "$s" "${args[@]}" \
      --calib-samples "$SAMPLES" --calib-cache "$OUT/calib.bin" > "$OUT/$m-$s.log" 2>&1
    end=$(date +%s.%N)
    "$BIN/patchrt" inspect "$b" 2>/dev/null | grep '^compile report' >> "$OUT/$m-$s.log" || true
    row "$m" "$s" "$b" "$(printf '%.0f' "$(echo "$end - $start" | bc -l)")"
    [ "${KEEP:-1}" != 0 ] && continue
    rm -f "$b"
  done
done
