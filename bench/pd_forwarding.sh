#!/usr/bin/env bash
# Forwarding: the paper's baseline admission (each request joins the FIFO queue of the prefill
# with the fewest open streams) vs on-demand forwarding (a full prefill refuses at once; requests
# wait at the gateway for whichever prefill frees first), on the SAME instances and workload:
# two prefill instances and one decode instance (separate processes, shared-memory KV transfer),
# and two gateways over them, one per policy. pdserve bench's A/B mode sends the same requests to
# both (A = baseline, B = on-demand), at loads A, 2A, 4A, ... Success = TTFT within the SLO, which
# grows with the prompt (SLO_TTFT_MS + SLO_TTFT_MS_PER_TOKEN x prompt tokens), as a scenario's SLO
# does in the paper. The on-demand gateway's TTFT budget (how long a request may wait for a
# prefill) is the SLO less the prefill's own time, so that it drops what can no longer make it.
#
#   bench/pd_forwarding.sh [OUT_DIR]        (prerequisite: make build)
#
# Environment: RATE_A (req/s of load A, 0.8), LOADS (multiples of A, "1 2 4"), N (requests per run,
# 60), SLO_TTFT_MS (1000) and SLO_TTFT_MS_PER_TOKEN (3), BUDGET_MS (900) and BUDGET_MS_PER_TOKEN
# (0.5: a prefill takes about 2.5 ms per prompt token on one thread here), SLOTS (prefill slots
# b_p, 1), LONG_SHARE (share of long prompts, 0.2), LONG_IN (long prompt lengths, normal:600:100).
# TRACE=FILE replays a Mooncake or Azure trace instead, scaled down: TRACE_SPEEDUP_A (0.25: load A's
# speedup), TRACE_INPUT_SCALE (0.03), TRACE_OUTPUT_SCALE (0.05), TRACE_MAX_INPUT (1500 tokens).
# The workload mixes short prompts (SHORT_IN, normal 64±16 tokens) and long ones, 16 output tokens
# each. Writes OUT_DIR/load_{1,2,4}.json, prints each run's tables, and ends with a line per load
# (OUT_DIR/summary.tsv).
#
# UTILS="0.4 0.6 0.8" instead of LOADS: first measure the prefills' capacity for this mix, then run
# at those fractions of it. The measurement is a closed loop through one on-demand gateway of its
# own (started before, stopped after; through baseline gateways it would measure the baseline's
# imbalance, not the prefills): CAL_USERS users — default one per prefill slot, so that every slot
# stays busy and none waits — and CAL_N requests (100) of one output token each, so that decode
# latency does not bound it (nor is a slot then held for a hand-off, as it is in the runs for the
# KV to leave: the capacity comes out a little high); its requests go to OUT_DIR/capacity.json.
# The capacity is the loop's users over the mix's mean time a request took in it (each kind's
# mean, weighted by LONG_SHARE),
# written with what it came from to OUT_DIR/slo.json; load A is 1 req/s × capacity (a load "0.6A"
# is 60 % of it). A fixed RATE_A means a different utilisation on every host.
#
# SLO_IN_PREFILL="B P" (with UTILS) sets the SLO from the same measurement, so that it means the
# same on every host: from the loop, a short prompt's mean time s and the time per prompt token t
# between the two kinds (the difference of their mean times over that of their mean lengths), the
# SLO is B × s + P × t per prompt token, and the on-demand budget the SLO less the prefill's own
# time with a margin: B × s − 30 ms + (P − BUDGET_MARGIN) × t per token (BUDGET_MARGIN 1.1).
# SLO_TTFT_MS* and BUDGET_MS* are then ignored; the values used are printed and written to
# OUT_DIR/slo.json.
#
# ROUNDS=R (1) runs every load R times on the same instances and gateways, round r with the
# workload's seed r (other arrivals and lengths each round), to OUT_DIR/load_<load>_round<r>.json.
#
# GATEWAYS=G (1) runs G gateways per policy over the same instances, as a deployment scaled out at
# the gateway tier does; requests go to them in turn. Each gateway counts only the streams it opened
# itself, so the baseline's "fewest open streams" sees 1/G of the traffic, while on-demand
# forwarding needs no count (a full prefill refuses, whichever gateway asks).
#
# On GPUs (one instance per GPU, KV over cuda-ipc): PREFILL_DEVICES (one prefill per entry, "cpu
# cpu"), DECODE_DEVICE (cpu), TRANSPORT (shm), MODEL (the default model; e.g. synthetic:llama-3.1-8b,
# whose tokenizer is the default model's), KV_MEMORY (256MiB), INSTANCE_ARGS (more instance flags,
# e.g. "--max-context 8192"; not --threads, which the script sets), PDSERVE
# (build/release/src/bin/pdserve). DECODE_THREADS (1): the decode instance's CPU threads, for loads
# whose decoding one thread cannot keep up with (each prefill runs one).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
out="${1:-build/bench/pd_forwarding}"
mkdir -p "$out"
tokenizer="models/SmolLM2-135M-Instruct.Q4_1.gguf"
model="${MODEL:-$tokenizer}"
pdserve="${PDSERVE:-build/release/src/bin/pdserve}"
for f in "$tokenizer" "$pdserve"; do
  [ -e "$f" ] || { echo "missing $f: run make build" >&2; exit 1; }
done
read -r -a prefill_devices <<<"${PREFILL_DEVICES:-cpu cpu}"
decode_device="${DECODE_DEVICE:-cpu}"
transport="${TRANSPORT:-shm}"
kv_memory="${KV_MEMORY:-256MiB}"
short_in="${SHORT_IN:-normal:64:16}"
rate_a="${RATE_A:-0.8}"
n="${N:-60}"
slo="${SLO_TTFT_MS:-1000}"
slo_per_token="${SLO_TTFT_MS_PER_TOKEN:-3}"
budget="${BUDGET_MS:-900}"
budget_per_token="${BUDGET_MS_PER_TOKEN:-0.5}"
loads="${LOADS:-1 2 4}"
slots="${SLOTS:-1}"
long_share="${LONG_SHARE:-0.2}"
long_in="${LONG_IN:-normal:600:100}"

trap stop_started EXIT

# NOTE: no prefix caching: both policies see the same prompts, the second would hit the cache.
instance=(instance --model "$model" --transport "$transport" --kv-cache-memory "$kv_memory"
          --prefill-slots "$slots" --no-prefix-caching)
read -r -a extra_args <<<"${INSTANCE_ARGS:-}"
instance+=("${extra_args[@]}")
gateway=(gateway --model "$model")
ports=()
for i in "${!prefill_devices[@]}"; do
  start "prefill$i.log" "${instance[@]}" --role prefill --threads 1 --port $((18201 + i)) --device "${prefill_devices[$i]}"
  gateway+=(--prefill "127.0.0.1:$((18201 + i))")
  ports+=($((18201 + i)))
done
start decode.log "${instance[@]}" --role decode --port 18200 --device "$decode_device" --threads "${DECODE_THREADS:-1}"
gateway+=(--decode 127.0.0.1:18200)
wait_ready "${ports[@]}" 18200

if [ -n "${UTILS:-}" ]; then
  [ -z "${TRACE:-}" ] || { echo "UTILS needs the synthetic mix, not TRACE" >&2; exit 1; }
  cal_users="${CAL_USERS:-$((${#prefill_devices[@]} * slots))}"
  start gateway_calibration.log "${gateway[@]}" --port 18299 --admission on-demand --ttft-budget-ms 60000
  wait_ready 18299
  echo "== capacity: closed loop, $cal_users users, ${CAL_N:-100} requests of the mix, through an on-demand gateway"
  "$pdserve" bench --base-url http://127.0.0.1:18299 --api completions --arrival closed --users "$cal_users" \
    -n "${CAL_N:-100}" --scenarios "[{\"name\": \"short\", \"weight\": $(python3 -c "print(1 - $long_share)"), \"input\": \"$short_in\"},
                {\"name\": \"long\", \"weight\": $long_share, \"input\": \"$long_in\"}]" \
    --output-len fixed:1 --ignore-eos --tokenizer-model "$tokenizer" --seed 99 --no-metrics -q --json "$out/capacity.json" >/dev/null
  kill "${started_pids[-1]}" 2>/dev/null || true
  wait "${started_pids[-1]}" 2>/dev/null || true
  unset 'started_pids[${#started_pids[@]}-1]'  # gone: not to be killed again at exit
  # The capacity for the mix, from each kind's mean time in the loop (share-weighted): the loop's
  # CAL_N requests are a sample whose share of long prompts is not LONG_SHARE (CAL_N=200 with
  # --seed 99 holds 28.5 % long ones against 20 %), and its own requests per second would be off
  # by as much.
  params=$(python3 - "$out/capacity.json" "$cal_users" \
    "$long_share" "${SLO_IN_PREFILL:-0 0}" "${BUDGET_MARGIN:-1.1}" "$out/slo.json" "$slo" "$slo_per_token" \
    "$budget" "$budget_per_token" <<'PY'
import json, sys
requests = json.load(open(sys.argv[1]))["runs"][0]["requests"]
slots, share = float(sys.argv[2]), float(sys.argv[3])
b, p = map(float, sys.argv[4].split())
margin = float(sys.argv[5])
def mean(kind, field):  # scenario 0: short, 1: long; requests that succeeded
    v = [r[field] for r in requests
         if r["scenario"] == kind and r.get("http_status") == 200 and not r.get("error") and r.get(field) is not None]
    if not v:
        sys.exit(f"the capacity loop finished no request of scenario {kind}: raise CAL_N")
    return sum(v) / len(v)
short_ms, long_ms = mean(0, "e2e_ms"), mean(1, "e2e_ms")
short_tok, long_tok = mean(0, "prompt_tokens"), mean(1, "prompt_tokens")
capacity = slots * 1e3 / ((1 - share) * short_ms + share * long_ms)  # req/s of the mix
out = {"short_ms": short_ms, "long_ms": long_ms, "short_tokens": short_tok, "long_tokens": long_tok,
       "capacity_rps": capacity}
if b > 0:
    if long_tok <= short_tok or long_ms <= short_ms:
        sys.exit("SLO_IN_PREFILL needs long prompts that take longer than the short ones (LONG_IN, SHORT_IN)")
    t = (long_ms - short_ms) / (long_tok - short_tok)  # ms per prompt token beyond a short prompt
    slo, slo_tok = b * short_ms, p * t
    budget, budget_tok = max(1.0, slo - 30.0), max(0.0, slo_tok - margin * t)
    out.update(prefill_ms_per_token=t, slo_ttft_ms=slo, slo_ttft_ms_per_token=slo_tok, budget_ms=budget,
               budget_ms_per_token=budget_tok)
    print(f"{capacity:.3f} {slo:.1f} {slo_tok:.3f} {round(budget)} {budget_tok:.3f}")
else:
    print(f"{capacity:.3f}", *sys.argv[7:11])
json.dump(out, open(sys.argv[6], "w"), indent=1)
PY
)
  read -r rate_a slo slo_per_token budget budget_per_token <<<"$params"
  loads="$UTILS"
  echo "   capacity $rate_a req/s of the mix; the loads below are fractions of it"
  if python3 -c "import json, sys; sys.exit('prefill_ms_per_token' not in json.load(open('$out/slo.json')))"; then
    echo "   $(python3 -c "import json; d = json.load(open('$out/slo.json')); print(f\"a short prompt {d['short_ms']:.0f} ms, {d['prefill_ms_per_token']:.3f} ms per prompt token beyond\")"):" \
      "SLO $slo ms + $slo_per_token ms/token, on-demand budget $budget ms + $budget_per_token ms/token"
  fi
fi

gateways="${GATEWAYS:-1}"
urls_baseline="" urls_on_demand="" gateway_ports=()
for ((g = 0; g < gateways; g++)); do
  pb=$((18300 + 2 * g)) po=$((18301 + 2 * g))
  start "gateway_baseline$g.log" "${gateway[@]}" --port "$pb" --admission baseline
  start "gateway_on_demand$g.log" "${gateway[@]}" --port "$po" --admission on-demand --ttft-budget-ms "$budget" \
    --ttft-budget-ms-per-token "$budget_per_token"
  urls_baseline+="${urls_baseline:+,}http://127.0.0.1:$pb"
  urls_on_demand+="${urls_on_demand:+,}http://127.0.0.1:$po"
  gateway_ports+=("$pb" "$po")
done
wait_ready "${gateway_ports[@]}"

rounds="${ROUNDS:-1}"
runs=()
for ((round = 1; round <= rounds; round++)); do
  [ "$rounds" = 1 ] || echo "== round $round of $rounds"
  for mult in $loads; do
    name="load_$mult"
    [ "$rounds" = 1 ] || name="load_${mult}_round$round"
    runs+=("$name")
    if [ -n "${TRACE:-}" ]; then
      # The trace scaled down: its arrivals sped up by TRACE_SPEEDUP_A x mult, its lengths scaled.
      speedup=$(python3 -c "print(${TRACE_SPEEDUP_A:-0.25} * $mult)")
      workload=(--trace "$TRACE" --trace-speedup "$speedup" --trace-input-scale "${TRACE_INPUT_SCALE:-0.03}"
                --trace-output-scale "${TRACE_OUTPUT_SCALE:-0.05}" --max-input-tokens "${TRACE_MAX_INPUT:-1500}")
      echo "== load ${mult}A: $TRACE at speedup $speedup ($n requests), TTFT SLO $slo ms + $slo_per_token ms/token; A = baseline, B = on-demand"
    else
      total=$(python3 -c "print($rate_a * $mult)")
      short=$(python3 -c "print($rate_a * $mult * (1 - $long_share))")
      long=$(python3 -c "print($rate_a * $mult * $long_share)")
      scenarios="[{\"name\": \"short\", \"rate\": $short, \"input\": \"$short_in\"},
                  {\"name\": \"long\", \"rate\": $long, \"input\": \"$long_in\"}]"
      workload=(--scenarios "$scenarios" --output-len fixed:16)
      echo "== load ${mult}A: $total req/s ($n requests), TTFT SLO $slo ms + $slo_per_token ms/token; A = baseline, B = on-demand"
    fi
    "$pdserve" bench --base-url "$urls_baseline" --ab-base-url "$urls_on_demand" --ab-rounds 1 \
      --api completions "${workload[@]}" --ignore-eos -n "$n" --seed "$round" \
      --tokenizer-model "$tokenizer" --slo-ttft-ms "$slo" --slo-ttft-ms-per-token "$slo_per_token" --no-metrics -q --json "$out/$name.json" || true
  done
done
# What the prefills refused, all loads and both policies together, as the first on-demand gateway
# sees the instances (their metrics lag by up to a second).
sleep 1.5
curl -s "http://127.0.0.1:18301/metrics" |
  grep -E "^pdserve_(prefill_priority_refusals_total|gateway_rejections_total)" || true

# One line per load (and round), also in OUT_DIR/summary.tsv: what each policy met, the on-demand requests that
# failed (drops at the gateway, mostly), and the goodput.
python3 - "$out" "$([ -n "${TRACE:-}" ] && echo 0 || echo "$rate_a")" "${runs[@]}" <<'PY'
import json, os, sys
out, rate_a, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
rows = ["run\treq_per_s\tbaseline_slo_met\ton_demand_slo_met\ton_demand_failed\tbaseline_goodput\ton_demand_goodput"]
print("== summary (A = baseline, B = on-demand)")
for name in names:  # load_<mult> or load_<mult>_round<r>
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        continue
    runs = json.load(open(path))["runs"]
    if len(runs) < 2:
        continue
    a, b = runs[0]["summary"], runs[1]["summary"]
    load = name.split("_")[1]
    rate = rate_a * float(load) if rate_a > 0 else float("nan")  # a trace: its own arrivals
    offered = "the trace" if rate_a <= 0 else f"{rate:.2f} req/s"
    print(f"   {name}: {load}A ({offered}): SLO met {a['slo_attainment']:.1%} vs {b['slo_attainment']:.1%}, "
          f"on-demand failed {b['num_errors']}, goodput {a['goodput_rps']:.2f} -> {b['goodput_rps']:.2f} req/s")
    rows.append(f"{name}\t{rate:.3f}\t{a['slo_attainment']:.4f}\t{b['slo_attainment']:.4f}\t{b['num_errors']}\t"
                f"{a['goodput_rps']:.3f}\t{b['goodput_rps']:.3f}")
open(os.path.join(out, "summary.tsv"), "w").write("\n".join(rows) + "\n")
PY
