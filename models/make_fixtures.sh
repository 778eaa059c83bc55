#!/usr/bin/env bash
# (Re)generate the ONNX test fixtures under models/fixtures/ from tiny random-weight
# Hugging Face models (fixed seeds), with ONNX Runtime goldens.
#
#   bash models/make_fixtures.sh                 # all fixtures
#   bash models/make_fixtures.sh --only gpt2     # a subset (names as in models/fixtures/)
#
# Creates models/.venv (git-ignored) on first use and installs the pinned packages of
# models/requirements-export.txt into it (torch from PyPI is the CUDA build, ~5 GB installed;
# only its CPU side is used). One venv suffices: optimum-onnx 0.1.0 exports with-past models
# with transformers 4.57 (< 4.58), which the torch dynamo / TorchScript exports use as well.
# Set PATCH_FIXTURES_PYTHON to use another interpreter (>= 3.10) for creating the venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
REQ="$HERE/requirements-export.txt"
PY="${PATCH_FIXTURES_PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi

# Install (a no-op when the pins are already satisfied).
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$REQ"
    "$VENV/bin/python" -m pip cache purge >/dev/null 2>&1 || true
    echo "$want" > "$stamp"
fi

# The transformers 5 fixtures (*_tf5_*) come from a second venv that reads the first one's
# packages (torch, onnx, ORT) through a .pth file and overlays transformers 5 and its own
# dependencies (optimum-onnx 0.1 needs transformers < 4.58, so one venv cannot hold both).
VENV5="$HERE/.venv-tf5"
REQ5="$HERE/requirements-export-tf5.txt"
if [ ! -x "$VENV5/bin/python" ]; then
    echo "creating $VENV5"
    "$PY" -m venv "$VENV5"
    base_site="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    tf5_site="$("$VENV5/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    echo "$base_site" > "$tf5_site/base-venv.pth"
fi
stamp5="$VENV5/.requirements.sha256"
want5="$(sha256sum "$REQ5" | cut -d' ' -f1)"
if [ ! -f "$stamp5" ] || [ "$(cat "$stamp5")" != "$want5" ]; then
    "$VENV5/bin/python" -m pip install --quiet --no-deps -r "$REQ5"
    echo "$want5" > "$stamp5"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$HERE"
# Each interpreter builds the fixtures of its transformers major version and skips the rest.
"$VENV/bin/python" "$HERE/export_fixtures.py" "$@"
"$VENV5/bin/python" "$HERE/export_fixtures.py" "$@"
"$VENV/bin/python" "$HERE/make_op_goldens.py"  # per-op goldens in fixtures/ops/
echo "fixtures written to $HERE/fixtures ($(du -sh "$HERE/fixtures" | cut -f1))"
