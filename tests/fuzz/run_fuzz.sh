#!/usr/bin/env bash
# Builds the fuzz targets with clang + libFuzzer (preset `fuzz`) and runs each for a bounded
# time on a seed corpus made by the unit tests' GGUF writer. Exit status: 0 if no crash.
#   tests/fuzz/run_fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
cd "$root"
if ! command -v clang++ >/dev/null; then
  echo "run_fuzz: clang++ is not installed (apt-get install clang); cannot build fuzz targets" >&2
  exit 1
fi
cmake --preset fuzz >/dev/null
cmake --build build/fuzz --target gguf_fuzz >/dev/null
corpus="build/fuzz/corpus/gguf"
mkdir -p "$corpus"
cp -n models/*.gguf "$corpus/" 2>/dev/null || true
# The default model is large; the fuzzer mutates a truncated copy of its header too.
if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  head -c 65536 models/SmolLM2-135M-Instruct.Q4_1.gguf > "$corpus/smollm2-head.gguf"
  rm -f "$corpus/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
build/fuzz/tests/fuzz/gguf_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=70000 "$corpus" 2>&1 | tail -n 5
