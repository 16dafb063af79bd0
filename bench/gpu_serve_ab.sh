#!/usr/bin/env bash
# `pdserve serve --device cuda` (A) against `pdserve serve --mode aggregated` on the CPU (B) on
# one machine: the same closed-loop workload through `pdserve bench --ab-base-url`, alternating
# A B, B A (docs/perf/gpu.md). Needs a GPU and a build with the CUDA backend.
#   OUT_DIR=DIR bench/gpu_serve_ab.sh        (PDSERVE: the binary, default build/release/src/bin/pdserve)
set -u
B=${PDSERVE:-build/release/src/bin/pdserve}
OUT_DIR=${OUT_DIR:-/tmp}
$B serve --device cuda --port 8101 --served-model-name smol --kv-cache-memory 8GiB --max-running 128 \
  --step-token-budget 2048 > $OUT_DIR/gpu_server.log 2>&1 &
$B serve --mode aggregated --port 8102 --served-model-name smol --threads 12 --max-running 64 > $OUT_DIR/cpu_server.log 2>&1 &
for p in 8101 8102; do
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:$p/health >/dev/null && break; sleep 0.5; done
  if ! curl -sf http://127.0.0.1:$p/health >/dev/null; then
    echo "gpu_serve_ab: the server on port $p did not start; see $OUT_DIR/*_server.log" >&2
    kill %1 %2 2>/dev/null
    exit 1
  fi
done
# NOTE: the two arms differ in --max-running and --step-token-budget; at 32 users neither binds.
grep -h "ready" $OUT_DIR/gpu_server.log $OUT_DIR/cpu_server.log
$B bench --base-url http://127.0.0.1:8101 --ab-base-url http://127.0.0.1:8102 --ab-rounds 2 --arrival closed \
  --users 32 -n 128 --input-len normal:256:64 --output-len fixed:64 --ignore-eos --client-threads 2 -q \
  --json $OUT_DIR/serve_ab.json 2>&1 | tail -40
kill %1 %2
wait
