#!/usr/bin/env bash
# Layer-wise KV transfer: a prefill that sends each prompt's KV whole after its first token (A) vs
# one that sends it layer by layer during its last forward pass (B, --kv-layer-wise), over the
# same transport into the SAME decode instance, one request at a time (pdserve bench's closed loop
# with one user; A/B runs alternate). Each request asks for 2 tokens, so its inter-token latency
# is exactly the gap between the prefill's first token and the decode's second: gather, transfer
# and scatter of the whole KV plus one decode step for A; the decode step (and whatever of the
# transfer did not fit in the prefill's pass) for B. TTFT should not change.
#
#   bench/pd_layer_wise.sh [OUT_DIR]        (prerequisite: make build)
#
# Environment: TRANSPORT (tcp), INPUT_LEN (prompt lengths, normal:2000:100), N (requests per run,
# 12), ROUNDS (A/B rounds, 3), THREADS (per instance, 1), STEP_BUDGET (the prefills'
# --step-token-budget, 4096: the prompts are prefilled in one pass, all of it overlapped), PDSERVE
# (build/release/src/bin/pdserve). Writes OUT_DIR/layer_wise.json and prints the tables.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
out="${1:-build/bench/pd_layer_wise}"
mkdir -p "$out"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
pdserve="${PDSERVE:-build/release/src/bin/pdserve}"
for f in "$model" "$pdserve"; do
  [ -e "$f" ] || { echo "missing $f: run make build" >&2; exit 1; }
done
transport="${TRANSPORT:-tcp}"
threads="${THREADS:-1}"

trap stop_started EXIT

# NOTE: no prefix caching: A and B send the same prompts.
instance=(instance --model "$model" --threads "$threads" --transport "$transport" --kv-cache-memory 512MiB
          --no-prefix-caching)
prefill=(--role prefill --prefill-slots 1 --step-token-budget "${STEP_BUDGET:-4096}")
start prefill_whole.log "${instance[@]}" "${prefill[@]}" --port 18401
start prefill_layer_wise.log "${instance[@]}" "${prefill[@]}" --kv-layer-wise --port 18402
start decode.log "${instance[@]}" --role decode --port 18400
wait_ready 18401 18402 18400
start gateway_whole.log gateway --model "$model" --prefill 127.0.0.1:18401 --decode 127.0.0.1:18400 --port 18410
start gateway_layer_wise.log gateway --model "$model" --prefill 127.0.0.1:18402 --decode 127.0.0.1:18400 --port 18411
wait_ready 18410 18411

echo "== $transport, prompts ${INPUT_LEN:-normal:2000:100}, 2 output tokens, one request at a time; A = whole KV, B = layer-wise"
"$pdserve" bench --base-url http://127.0.0.1:18410 --ab-base-url http://127.0.0.1:18411 --ab-rounds "${ROUNDS:-3}" \
  --api completions --input-len "${INPUT_LEN:-normal:2000:100}" --output-len fixed:2 --ignore-eos \
  --arrival closed --users 1 -n "${N:-12}" --tokenizer-model "$model" --no-metrics --json "$out/layer_wise.json"
curl -sf http://127.0.0.1:18411/metrics | grep -E '^pdserve_(layer_wise_)?handoffs_total' || true
