#!/bin/sh
# Build the ragtop onnxruntime plugin and install it as ragtop/_native/libragtop_ort.so.
# Called by `make install`. Never fails the caller: when a compiler, cmake or the ORT
# headers are missing it prints a warning and exits 0 (the ONNX functions' standard-op
# bodies then run instead of the kernels). Set RAGTOP_PLUGIN_STRICT=1 to fail instead.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD="$ROOT/build/plugin"
HEADERS="$ROOT/build/ort-headers"
DEST="$ROOT/ragtop/_native"

warn() {
  echo "WARNING: ragtop onnxruntime plugin not built: $*" >&2
  echo "         (models still run through the standard-op function bodies)" >&2
  [ "${RAGTOP_PLUGIN_STRICT:-0}" = 1 ] && exit 1
  exit 0
}

command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || warn "no C++ compiler"
sh "$ROOT/plugins/onnxruntime/fetch_headers.sh" "$HEADERS" || warn "could not fetch the ONNX Runtime headers"

if command -v cmake >/dev/null 2>&1; then
  cmake -S "$ROOT/plugins" -B "$BUILD" -DORT_INCLUDE_DIR="$HEADERS" -DCMAKE_BUILD_TYPE=Release >"$BUILD.log" 2>&1 \
    && cmake --build "$BUILD" -j 2 >>"$BUILD.log" 2>&1 \
    || { tail -n 30 "$BUILD.log" >&2; warn "compilation failed (log: $BUILD.log)"; }
  LIB="$BUILD/libragtop_ort.so"
else  # same flags as plugins/CMakeLists.txt
  mkdir -p "$BUILD"
  LIB="$BUILD/libragtop_ort.so"
  ${CXX:-g++} -std=gnu++17 -O3 -fPIC -shared -fopenmp-simd -fno-math-errno -fvisibility=hidden \
    -fvisibility-inlines-hidden -isystem "$HEADERS" "$ROOT/plugins/onnxruntime/ragtop_ort.cc" \
    -Wl,--no-undefined -Wl,--exclude-libs,ALL -static-libstdc++ -static-libgcc -o "$LIB" >"$BUILD.log" 2>&1 \
    || { tail -n 30 "$BUILD.log" >&2; warn "compilation failed (log: $BUILD.log)"; }
fi
mkdir -p "$DEST"
cp "$LIB" "$DEST/libragtop_ort.so.tmp" && mv "$DEST/libragtop_ort.so.tmp" "$DEST/libragtop_ort.so" \
  || warn "could not install into $DEST"
echo "ragtop onnxruntime plugin: $DEST/libragtop_ort.so"
