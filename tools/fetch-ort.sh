#!/usr/bin/env bash
# fetch-ort.sh: provision ONNX Runtime's shared library into .ort/.
#
# The library comes from the npm package onnxruntime-node (the tarball only;
# `npm pack` runs no install scripts). The tarball is checked against a pinned
# SHA-256 before anything is extracted. Idempotent: when .ort/ already holds
# the library with the pinned checksum it does nothing, so it works offline
# once done.
set -euo pipefail

ORT_VERSION="1.30.0"
TARBALL_SHA256="6e3390d6b783e7be946fad629292799da28d0b42f84856e50d2c1b0383291e75"
LIB_SHA256="ffb75a925ba05e47b235bb66e3e3911714a80b328a9c9425539feb204aa32a23"
LIB_IN_TARBALL="package/bin/napi-v6/linux/x64/libonnxruntime.so.1"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.ort"
lib="$dest/libonnxruntime.so.1"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$lib" ] && [ "$(sha "$lib")" = "$LIB_SHA256" ]; then
  echo "ort: $lib is ONNX Runtime $ORT_VERSION (checksum ok)"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "ort: only linux/x86_64 is provisioned by this script; set runtime.library or TESSERA_ORT_LIB to your libonnxruntime" >&2; exit 1 ;;
esac

mkdir -p "$dest"
tgz="$dest/onnxruntime-node-$ORT_VERSION.tgz"
if [ ! -f "$tgz" ] || [ "$(sha "$tgz")" != "$TARBALL_SHA256" ]; then
  command -v npm >/dev/null || { echo "ort: npm is needed to fetch onnxruntime-node@$ORT_VERSION (apt-get install npm)" >&2; exit 1; }
  tmp="$(mktemp -d "$dest/pack.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent --ignore-scripts "onnxruntime-node@$ORT_VERSION" >/dev/null)
  mv "$tmp/onnxruntime-node-$ORT_VERSION.tgz" "$tgz"
fi
got="$(sha "$tgz")"
if [ "$got" != "$TARBALL_SHA256" ]; then
  echo "ort: checksum mismatch for $tgz: got $got, want $TARBALL_SHA256" >&2
  rm -f "$tgz"
  exit 1
fi
tar -xzf "$tgz" -C "$dest" --strip-components=5 "$LIB_IN_TARBALL"
got="$(sha "$lib")"
if [ "$got" != "$LIB_SHA256" ]; then
  echo "ort: checksum mismatch for $lib: got $got, want $LIB_SHA256" >&2
  rm -f "$lib"
  exit 1
fi
rm -f "$tgz"
echo "ort: installed ONNX Runtime $ORT_VERSION at $lib"
