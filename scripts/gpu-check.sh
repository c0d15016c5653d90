#!/usr/bin/env bash
# The GPU check of issue 17, as one prepared run.
#
#   scripts/gpu-check.sh            on a GPU machine: build llama-server with CUDA for
#                                   CMAKE_CUDA_ARCHITECTURES (default 90 = H100/H200) only,
#                                   target llama-server, ninja, $JOBS jobs; run the checks of
#                                   scripts/gpu_check.py; write docs/gpu.md.
#                                   Without nvcc or without a GPU it is a DRY RUN: the same flow
#                                   on the CPU build, written to $DRY_OUT, never to docs/gpu.md.
#   scripts/gpu-check.sh --dry-run  force the dry run.
#   scripts/gpu-check.sh --pack DIR prepare here what a machine with no network needs:
#                                   DIR/wheels (routerd's dependencies) and DIR/llama.cpp.tar.gz
#                                   (the vendored llama.cpp sources, trimmed to what the
#                                   llama-server target builds from).
# Offline inputs on the GPU machine (all optional when present already):
#   WHEELS=DIR/wheels  PACK=DIR (or LLAMA_CPP_SRC=an unpacked llama.cpp)  MODEL=model.gguf
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
ARCH=${CMAKE_CUDA_ARCHITECTURES:-90}
MODEL=${MODEL:-$HOME/.cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf}
WORK=${WORK:-/tmp/routerd-gpu-check}
DRY_OUT=${DRY_OUT:-$WORK/gpu-dry-run.md}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-420}
LCP_VERSION=${LCP_VERSION:-0.3.36}
CACHE=${ROUTERD_CACHE:-$HOME/.cache/routerd}
log() { printf '[gpu-check] %s\n' "$*" >&2; }
start=$SECONDS

pack() {
  local dir=$1 py=${VENV}/bin/python
  mkdir -p "$dir/wheels"
  log "downloading wheels for routerd's dependencies into $dir/wheels"
  # shellcheck disable=SC2046
  "$py" -m pip download -q -d "$dir/wheels" "setuptools>=68" wheel $("$py" - <<'PYEOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d.split(";")[0].replace(" ", "") for d in deps))
PYEOF
)
  local sdist="$CACHE/dl/llama_cpp_python-$LCP_VERSION.tar.gz" p="llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
  [ -f "$sdist" ] || { log "no $sdist: run make install first"; exit 2; }
  log "packing the llama.cpp sources llama-server builds from into $dir/llama.cpp.tar.gz"
  tar -xzf "$sdist" -C "$dir" "$p" \
    --exclude="$p/models" --exclude="$p/docs" --exclude="$p/media" --exclude="$p/benches" \
    --exclude="$p/gguf-py" --exclude="$p/tests" --exclude="$p/examples" --exclude="$p/.devops" \
    --exclude="$p/.github"
  tar -czf "$dir/llama.cpp.tar.gz" -C "$dir/llama_cpp_python-$LCP_VERSION/vendor" llama.cpp
  rm -rf "$dir/llama_cpp_python-$LCP_VERSION"
  du -sh "$dir"/wheels "$dir"/llama.cpp.tar.gz >&2
  exit 0
}

mode=gpu
case "${1:-}" in
  --pack) pack "${2:?--pack DIR}" ;;
  --dry-run) mode=dry-run ;;
  "") ;;
  *) log "usage: $0 [--dry-run | --pack DIR]"; exit 2 ;;
esac
if [ "$mode" = gpu ]; then
  if ! command -v nvcc >/dev/null 2>&1; then
    log "no nvcc: DRY RUN on the CPU build"; mode=dry-run
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    log "nvcc found but no GPU (nvidia-smi lists none): DRY RUN on the CPU build"; mode=dry-run
  fi
fi
device=""
[ "$mode" = gpu ] && device=$(nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | head -1)
log "mode: $mode${device:+ ($device)}"

# 1. routerd in a venv, offline from $WHEELS when pip has no network.
if ! "$VENV/bin/python" -c 'import routerd, structlog, gguf, aiohttp, yaml, pynvml' 2>/dev/null; then
  log "setting up $VENV${WHEELS:+ from $WHEELS}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  if [ -n "${WHEELS:-}" ]; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" -e .
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
fi

# 2. The engine: the CUDA build on a GPU, the cached CPU build in a dry run (same script).
# Sources: LLAMA_CPP_SRC, else a --pack bundle in $PACK, else the sdist setup-engines caches.
if [ -z "${LLAMA_CPP_SRC:-}" ] && [ -f "${PACK:-/nonexistent}/llama.cpp.tar.gz" ]; then
  mkdir -p "$WORK/src" && tar -xzf "$PACK/llama.cpp.tar.gz" -C "$WORK/src"
  LLAMA_CPP_SRC="$WORK/src/llama.cpp"
fi
[ -n "${LLAMA_CPP_SRC:-}" ] && export LLAMA_CPP_SRC
t0=$SECONDS
if [ "$mode" = gpu ]; then
  ROUTERD_CUDA=1 CMAKE_CUDA_ARCHITECTURES="$ARCH" ROUTERD_ENGINES=llama-server \
    JOBS=${JOBS:-$(nproc)} bash scripts/setup-engines.sh "$VENV"
else
  ROUTERD_CUDA=0 ROUTERD_ENGINES=llama-server bash scripts/setup-engines.sh "$VENV"
fi
log "engine ready in $((SECONDS - t0)) s: $(readlink -f "$VENV/bin/llama-server")"
[ -s "$MODEL" ] || { log "no model at $MODEL (set MODEL=...)"; exit 2; }

# 3. The checks, bounded.
out=$DRY_OUT
[ "$mode" = gpu ] && out=docs/gpu.md
rc=0
timeout "$CHECK_TIMEOUT" "$VENV/bin/python" scripts/gpu_check.py --mode "$mode" \
  --llama-server "$VENV/bin/llama-server" --model "$MODEL" --out "$out" --work "$WORK" \
  --routerd "$VENV/bin/routerd" --device "$device" || rc=$?
log "checks exited $rc after $((SECONDS - start)) s in all; report: $out"
exit "$rc"
