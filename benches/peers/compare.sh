#!/usr/bin/env bash
# patchrt against llama.cpp and ONNX Runtime on SmolLM2-135M, side by side in one run.
#
#   bash benches/peers/compare.sh [--threads N] [--rounds R] [--hybrid S=BUNDLE ...] [--no-ort]
#                                 [--isa avx2]
#
# `--isa avx2` restricts both sides to AVX2 + FMA + F16C on an AVX-512 host (llama.cpp built with
# GGML_NATIVE=OFF and only those flags, patchrt with PATCH_KERNEL_PATH=avx2, ONNX Runtime left
# out since it picks its own ISA): a stand-in for an AVX2-only CPU on the same memory system,
# not a measurement of one.
#
# One command from a clone: builds patchrt and patchc (release), prepares the model
# (models/smollm2-135m/prepare.sh), finds llama.cpp (LLAMA_CPP_BIN=DIR holding llama-bench and
# llama-quantize, else benches/peers/build/llama) or builds it from the sources vendored in the
# PyPI sdist of llama-cpp-python (6 to 15 minutes on 2 idle cores), converts the GGUF that the
# model's weights come from to F32 / BF16 / F16 / Q8_0 (the same dequantized weights the
# bundles hold, rounded to each type), compiles the dense bundles and, unless given with
# --hybrid, hybrid bf16 bundles at 25 / 40 / 45 / 50% (`--method magnitude`: the tile map decides
# the speed, not the quality of the masks), then runs benches/peers/compare.py, which
# interleaves every side round by round and prints one table of medians with the ratios to
# llama.cpp and each side's share of its bandwidth bound.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$ROOT/benches/peers/build"
threads=2
rounds=5
ort=1
isa=native
hybrid=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --hybrid) hybrid+=("$2"); shift 2 ;;
    --no-ort) ort=0; shift ;;
    --isa) isa="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { echo "compare.sh: $*" >&2; }
case "$isa" in
  native) LLAMA_FLAGS=(-DGGML_NATIVE=ON); LLAMA_NAME=llama ;;
  avx2)
    LLAMA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
    LLAMA_NAME=llama-avx2
    export PATCH_KERNEL_PATH=avx2
    ort=0
    ;;
  *) echo "compare.sh: --isa is native or avx2, not $isa" >&2; exit 2 ;;
esac
mkdir -p "$WORK/models"

log "building patchrt and patchc (release)"
(cd "$ROOT" && cargo build --release --locked -q --bin patchrt --bin patchc)
PATCHRT="$ROOT/target/release/patchrt"
PATCHC="$ROOT/target/release/patchc"

log "preparing SmolLM2-135M"
bash "$ROOT/models/smollm2-135m/prepare.sh" >&2
GGUF="$(bash "$ROOT/models/smollm2-135m/prepare.sh" --print-gguf)"
ONNX="$ROOT/models/smollm2-135m/model_with_past.onnx"

# Python with onnxruntime (the ONNX Runtime side) and gguf (tensor sizes of the GGUFs).
VENV="$WORK/venv"
REQS=(onnxruntime==1.32.0 numpy==2.4.6 gguf==0.19.0 cmake ninja)
if [ "$(cat "$VENV/.reqs" 2>/dev/null)" != "${REQS[*]}" ]; then
  log "creating $VENV (${REQS[*]})"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQS[@]}"
  echo "${REQS[*]}" > "$VENV/.reqs"
fi

# llama.cpp: given, built before, or built now (only the two tools this bench needs).
LLAMA="${LLAMA_CPP_BIN:-$WORK/$LLAMA_NAME/bin}"
if [ ! -x "$LLAMA/llama-bench" ] || [ ! -x "$LLAMA/llama-quantize" ]; then
  [ -n "${LLAMA_CPP_BIN:-}" ] && { echo "compare.sh: no llama-bench / llama-quantize in $LLAMA_CPP_BIN" >&2; exit 1; }
  VERSION=0.3.36
  SRCDIR="$WORK/llama"
  mkdir -p "$SRCDIR"
  if [ ! -d "$SRCDIR/llama_cpp_python-$VERSION" ]; then
    log "downloading the llama-cpp-python $VERSION sdist (llama.cpp sources)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python -d "$SRCDIR/dl" "llama-cpp-python==$VERSION"
    tar xzf "$SRCDIR/dl/llama_cpp_python-$VERSION.tar.gz" -C "$SRCDIR"
  fi
  log "building llama-bench and llama-quantize (${LLAMA_FLAGS[*]})"
  PATH="$VENV/bin:$PATH" cmake -S "$SRCDIR/llama_cpp_python-$VERSION/vendor/llama.cpp" \
    -B "$SRCDIR/build-$LLAMA_NAME" -G Ninja -DCMAKE_BUILD_TYPE=Release "${LLAMA_FLAGS[@]}" \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >/dev/null
  PATH="$VENV/bin:$PATH" ninja -C "$SRCDIR/build-$LLAMA_NAME" -j"$(nproc)" llama-bench llama-quantize >/dev/null
  mkdir -p "$LLAMA"
  ln -sf "$SRCDIR/build-$LLAMA_NAME/bin/llama-bench" "$LLAMA/llama-bench"
  ln -sf "$SRCDIR/build-$LLAMA_NAME/bin/llama-quantize" "$LLAMA/llama-quantize"
fi

gguf_args=()
for f in F32 BF16 F16 Q8_0; do
  out="$WORK/models/smollm2-135m-$f.gguf"
  if [ ! -s "$out" ] || [ "$out" -ot "$GGUF" ]; then
    log "converting the GGUF to $f"
    "$LLAMA/llama-quantize" --allow-requantize "$GGUF" "$out.tmp" "$f" >/dev/null 2>&1
    mv "$out.tmp" "$out"
  fi
  gguf_args+=(--gguf "$f=$out")
done

bundle_args=()
for d in f32 bf16 f16; do
  out="$WORK/models/dense-$d.patch"
  if [ ! -s "$out" ] || [ "$out" -ot "$PATCHC" ]; then
    log "compiling the dense $d bundle"
    "$PATCHC" compile "$ONNX" --weights "$d" -o "$out" >/dev/null 2>&1
  fi
  bundle_args+=(--bundle "dense $d=$out")
done
if [ ${#hybrid[@]} -eq 0 ]; then
  for s in 25 40 45 50; do
    out="$WORK/models/magnitude-$s-bf16.patch"
    if [ ! -s "$out" ] || [ "$out" -ot "$PATCHC" ]; then
      log "compiling a hybrid bf16 bundle at $s% (--method magnitude)"
      "$PATCHC" compile "$ONNX" --weights bf16 --sparsity "0.$s" --method magnitude -o "$out" >/dev/null 2>&1
    fi
    bundle_args+=(--bundle "hybrid $s% bf16 (magnitude tiles)=$out")
  done
else
  for h in "${hybrid[@]}"; do
    bundle_args+=(--bundle "hybrid ${h%%=*} bf16=${h#*=}")
  done
fi

ort_args=()
[ "$ort" = 1 ] && ort_args=(--onnx "$ONNX")
[ "$isa" = avx2 ] && log "both sides restricted to AVX2 + FMA + F16C (PATCH_KERNEL_PATH=avx2)"
log "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; ISA: $(grep -o -w -E 'avx512_bf16|avx512_fp16|avx512f|avx2|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
"$VENV/bin/python" "$ROOT/benches/peers/compare.py" --threads "$threads" --rounds "$rounds" \
  --llama-bench "$LLAMA/llama-bench" --patchrt "$PATCHRT" "${gguf_args[@]}" "${ort_args[@]}" \
  "${bundle_args[@]}" --json "$WORK/last-run.json"
