#!/usr/bin/env bash
# P/D vs aggregated on this machine: `pdserve serve` (a prefill and a decode instance in one
# process, in-process KV transfer) vs `pdserve serve --mode aggregated` (one instance doing both),
# same model, threads and workload, with pdserve bench's A/B mode (A = aggregated, B =
# disaggregated, the same requests alternating). At a rate both sustain (equal throughput) the
# TTFT and TPOT percentiles compare the two.
#
#   bench/pd_vs_aggregated.sh [OUT_DIR]        (prerequisite: make build)
#
# Environment: THREADS (2), N (requests per rate, 40), RATES (req/s, "0.5 1"), ROUNDS (A/B rounds, 1),
# SEED (of the first rate's prompts, 1; each later rate takes the next).
# Prompts normal(256, 32) tokens, outputs normal(128, 16), Poisson arrivals. Writes
# OUT_DIR/rate_<r>.json and prints each run's tables.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
out="${1:-build/bench/pd_vs_aggregated}"
mkdir -p "$out"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
pdserve=build/release/src/bin/pdserve
for f in "$model" "$pdserve"; do
  [ -e "$f" ] || { echo "missing $f: run make build" >&2; exit 1; }
done
threads="${THREADS:-2}"
common=(serve --model "$model" --threads "$threads" --max-running 32 --kv-cache-memory 512MiB)
"$pdserve" "${common[@]}" --mode aggregated --port 18301 >"$out/aggregated.log" 2>&1 &
pid_a=$!
"$pdserve" "${common[@]}" --mode disaggregated --port 18302 >"$out/disaggregated.log" 2>&1 &
pid_b=$!
trap 'kill $pid_a $pid_b 2>/dev/null || true; wait 2>/dev/null || true' EXIT
wait_ready 18301 18302
# NOTE: a new seed per rate: the same prompts again would hit each server's prefix cache.
seed="${SEED:-1}"
for rate in ${RATES:-0.5 1}; do
  echo "== ${N:-40} requests, Poisson $rate req/s; A = aggregated, B = disaggregated"
  "$pdserve" bench --base-url http://127.0.0.1:18301 --ab-base-url http://127.0.0.1:18302 --ab-rounds "${ROUNDS:-1}" \
    --api completions --input-len normal:256:32 --output-len normal:128:16 --ignore-eos --arrival poisson \
    --rate "$rate" -n "${N:-40}" --seed "$seed" --tokenizer-model "$model" --slo-ttft-ms 2000 --slo-tpot-ms 200 --no-metrics -q \
    --json "$out/rate_$rate.json" || true
  seed=$((seed + 1))
done
