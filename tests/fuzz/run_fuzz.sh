#!/usr/bin/env bash
# Builds the fuzz targets with clang + libFuzzer (preset `fuzz`) and runs each for a bounded
# time on a seed corpus. Exit status: 0 if no crash.
#   tests/fuzz/run_fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (targets: gguf_fuzz api_request_fuzz)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_fuzz api_request_fuzz)
cd "$root"
if ! command -v clang++ >/dev/null; then
  echo "run_fuzz: clang++ is not installed (apt-get install clang); cannot build fuzz targets" >&2
  exit 1
fi
cmake --preset fuzz >/dev/null
cmake --build build/fuzz --target "${targets[@]}" >/dev/null
for target in "${targets[@]}"; do
  case "$target" in
    gguf_fuzz)
      # Seeds: the GGUF files at hand; the default model is large, so a truncated copy of its header.
      corpus="build/fuzz/corpus/gguf"
      mkdir -p "$corpus"
      cp -n models/*.gguf "$corpus/" 2>/dev/null || true
      if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
        head -c 65536 models/SmolLM2-135M-Instruct.Q4_1.gguf > "$corpus/smollm2-head.gguf"
        rm -f "$corpus/SmolLM2-135M-Instruct.Q4_1.gguf"
      fi
      build/fuzz/tests/fuzz/gguf_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=70000 "$corpus" 2>&1 | tail -n 5
      ;;
    api_request_fuzz)
      # Seeds: tests/fuzz/corpus/api_request (checked in); what the fuzzer finds goes to build/.
      corpus="build/fuzz/corpus/api_request"
      mkdir -p "$corpus"
      build/fuzz/tests/fuzz/api_request_fuzz -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 \
        -dict=tests/fuzz/api_request.dict "$corpus" tests/fuzz/corpus/api_request 2>&1 | tail -n 5
      ;;
    *) echo "run_fuzz: unknown target $target" >&2; exit 2 ;;
  esac
done
