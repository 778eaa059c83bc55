#!/usr/bin/env bash
# The Debian Administrator's Handbook as plain English prose, for perplexity evaluation.
#
#   bash models/debian-handbook/prepare.sh      # -> models/debian-handbook/build/eval.txt, eval.json
#
# Needs apt-get and dpkg-deb (Debian) and python3 (standard library only). Downloads the Debian
# package debian-handbook 11.20220922 (bookworm main, arch all) with `apt-get download` into
# models/debian-handbook/pkg/ (git-ignored; nothing is installed on the system), checks the .deb's
# sha256, unpacks its English HTML there and turns it into text with extract.py (rules in
# README.md). Idempotent: does nothing if build/eval.txt already matches eval.sha256.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="debian-handbook"
VER="11.20220922"
DEB_SHA256="3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"
PKGDIR="$HERE/pkg"
DEB="$PKGDIR/${PKG}_${VER}_all.deb"
ROOT="$PKGDIR/root"
HTML="$ROOT/usr/share/doc/debian-handbook/html/en-US"
OUT="$HERE/build"
PY="${PYTHON:-python3}"

if [ -f "$OUT/eval.txt" ] && (cd "$OUT" && sha256sum --quiet -c "$HERE/eval.sha256" >/dev/null 2>&1); then
  echo "prepare.sh: $OUT/eval.txt already verified against eval.sha256, nothing to do" >&2
  exit 0
fi

deb_ok() { [ -f "$DEB" ] && [ "$(sha256sum "$DEB" | cut -d' ' -f1)" = "$DEB_SHA256" ]; }

if ! deb_ok; then
  mkdir -p "$PKGDIR"
  rm -f "$DEB"
  echo "prepare.sh: apt-get download $PKG=$VER into $PKGDIR" >&2
  # apt-get download needs current package lists; refresh them once if the version is not found.
  if ! (cd "$PKGDIR" && apt-get -o APT::Sandbox::User=root download "$PKG=$VER" >&2); then
    if [ "$(id -u)" = 0 ]; then
      echo "prepare.sh: apt-get update, then retry" >&2
      apt-get update >&2
      (cd "$PKGDIR" && apt-get -o APT::Sandbox::User=root download "$PKG=$VER" >&2)
    else
      echo "prepare.sh: apt-get download failed; run 'apt-get update' as root and retry" >&2
      exit 1
    fi
  fi
  deb_ok || { echo "prepare.sh: $DEB: sha256 is not $DEB_SHA256" >&2; exit 1; }
fi

if [ ! -f "$ROOT/.unpacked-$DEB_SHA256" ]; then
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  # Only the English HTML pages (2.5 MB of the 94 MB installed size; the images and CSS are
  # hard links into other languages' folders and are not needed).
  dpkg-deb --fsys-tarfile "$DEB" \
    | tar -x -C "$ROOT" --wildcards './usr/share/doc/debian-handbook/html/en-US/*.html'
  touch "$ROOT/.unpacked-$DEB_SHA256"
fi

"$PY" "$HERE/extract.py" "$HTML" "$OUT" --check "$HERE/eval.sha256"
