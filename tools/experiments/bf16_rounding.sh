#!/usr/bin/env bash
# Applies bf16_rounding.patch to the CPU forward pass for one run, builds bf16_rounding.cpp
# against the release build's libraries, prints for each emulated rounding which of the 20 golden
# prompts' 64-token greedy continuations part from the plain bf16 model (and the top-2 gap there),
# and takes the patch back out (also on failure). Minutes on 2 cores.
#   tools/experiments/bf16_rounding.sh [MODEL.gguf]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
model="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
git apply tools/experiments/bf16_rounding.patch
trap 'git apply -R tools/experiments/bf16_rounding.patch' EXIT
cmake --preset release >/dev/null
cmake --build build/release --target pdserve_test_support pdserve_model | tail -n 1
out="$(mktemp -d)"
b=build/release
c++ -std=c++20 -O2 -I"$root/src" -I"$root" -DFMT_SHARED tools/experiments/bf16_rounding.cpp -o "$out/bf16_rounding" \
  $b/tests/support/libpdserve_test_support.a $b/src/model/libpdserve_model.a $b/src/kernels/libpdserve_kernels.a \
  $b/src/common/libpdserve_common.a -lxxhash -lfmt -lpthread
"$out/bf16_rounding" "$model" tests/golden/data/model_smollm2.json
rm -rf "$out"
