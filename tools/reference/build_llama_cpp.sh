#!/usr/bin/env bash
# Builds the reference implementation, llama.cpp, from the llama-cpp-python source package on
# PyPI (pinned below), into build/reference/. Used by the fixture generator and the CPU
# benchmarks; never by CI. Idempotent: a finished build is reused.
#
#   tools/reference/build_llama_cpp.sh        # prints the directory that holds the build
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
ref="$root/build/reference"
src="$ref/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
bld="$ref/llama.cpp-build"

mkdir -p "$ref"
if [ ! -d "$src" ]; then
  echo "reference: downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (source package)" >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$ref" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$ref/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$ref"
fi

# The reference is built the way its users build it for this CPU: release, every SIMD extension the
# CPU has (AVX2/FMA/F16C, AVX-512 with VNNI/BF16/VBMI where present) but not AMX: AMX tile
# instructions fault on machines whose kernel does not grant them (seen on virtual machines),
# and pdserve does not use AMX either. Shared libraries, because the Python binding loads
# libllama.so through LLAMA_CPP_LIB_PATH.
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $cpu_flags " == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512cd; then
  flags+=(-DGGML_AVX512=ON)
  has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
  has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
  has avx512vbmi && flags+=(-DGGML_AVX512_VBMI=ON)
fi
has avx_vnni && flags+=(-DGGML_AVX_VNNI=ON)
config="${flags[*]}"
if [ ! -x "$bld/bin/llama-bench" ] || [ ! -f "$bld/bin/libllama.so" ] || \
   [ "$(cat "$bld/.pdserve-config" 2>/dev/null)" != "$config" ]; then
  echo "reference: building llama.cpp (takes several minutes on 2 cores)" >&2
  cmake -S "$src/vendor/llama.cpp" -B "$bld" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "${flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$bld/bin" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bld/bin" >&2
  cmake --build "$bld" -j "$(nproc)" --target llama llama-bench llama-batched-bench \
    llama-tokenize llama-server llama-cli llama-simple >&2
  echo "$config" > "$bld/.pdserve-config"
fi
echo "$ref"
