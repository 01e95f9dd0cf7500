#!/bin/sh
# Fetch the ONNX Runtime C/C++ headers into $1 (default: build/ort-headers).
#
# The onnxruntime wheels ship no headers. Debian trixie packages them as
# libonnxruntime-dev. On a machine whose apt already knows that package we download it
# with the system configuration; otherwise (bookworm) we use a private apt configuration
# (own sources list, lists/cache dirs, empty status) so the system's apt state is never
# touched. Either way the .deb is only unpacked with `dpkg-deb -x`, never installed.
# Exit status is non-zero when no headers could be obtained; the caller decides.
set -eu
DEST=${1:-build/ort-headers}
HDR=onnxruntime_lite_custom_op.h

if [ -f "$DEST/$HDR" ]; then echo "ORT headers: $DEST (cached)"; exit 0; fi
for d in /usr/include/onnxruntime /usr/local/include/onnxruntime; do
  if [ -f "$d/$HDR" ]; then
    mkdir -p "$DEST" && cp "$d"/*.h "$DEST"/ && echo "ORT headers: copied from $d"; exit 0
  fi
done
command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: cannot fetch ORT headers" >&2; exit 1; }
command -v dpkg-deb >/dev/null 2>&1 || { echo "no dpkg-deb: cannot unpack ORT headers" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/etc/preferences.d" "$WORK/etc/sources.list.d"
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
MIRROR=${RAGTOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
echo "deb [arch=$ARCH] $MIRROR trixie main" > "$WORK/etc/sources.list"
# Trust the system keyring (the Debian archive keys sign trixie too).
APT_OPTS="-o Dir::Etc=$WORK/etc -o Dir::Etc::sourcelist=$WORK/etc/sources.list \
 -o Dir::Etc::sourceparts=$WORK/etc/sources.list.d -o Dir::Etc::preferencesparts=$WORK/etc/preferences.d \
 -o Dir::Etc::trusted=/etc/apt/trusted.gpg -o Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d \
 -o Dir::State::Lists=$WORK/lists -o Dir::State::status=/dev/null \
 -o Dir::Cache::archives=$WORK/archives -o Dir::Cache=$WORK/cache -o Debug::NoLocking=1 \
 -o APT::Sandbox::User=$(id -un)"
# shellcheck disable=SC2086
apt-get $APT_OPTS -qq update >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; echo "apt update failed" >&2; exit 1; }
# shellcheck disable=SC2086
(cd "$WORK" && apt-get $APT_OPTS -qq download libonnxruntime-dev) >>"$WORK/apt.log" 2>&1 \
  || { cat "$WORK/apt.log" >&2; echo "could not download libonnxruntime-dev" >&2; exit 1; }
DEB=$(ls "$WORK"/libonnxruntime-dev_*.deb | head -1)
dpkg-deb -x "$DEB" "$WORK/root"
SRC=$(dirname "$(find "$WORK/root" -name "$HDR" | head -1)")
[ -f "$SRC/$HDR" ] || { echo "$HDR not in $DEB" >&2; exit 1; }
mkdir -p "$DEST"
cp "$SRC"/*.h "$DEST"/
echo "ORT headers: $(basename "$DEB") -> $DEST"
