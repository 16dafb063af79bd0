#!/usr/bin/env bash
# Goodput on the GPUs of one host: P/D groups (prefill and decode instances on separate GPUs,
# KV over cuda-ipc, behind `pdserve launch`'s gateway) against as many aggregated instances
# (`pdserve serve --mode aggregated`, one per GPU), the same Poisson workload at each rate. The
# aggregated arm splits the load evenly: one `pdserve bench` per instance at rate / GPUs (each a
# Poisson process of its own, with its own seed) — what a random load balancer does. Goodput:
# requests per second that meet both SLOs (TTFT <= SLO_TTFT_MS, TPOT <= SLO_TPOT_MS).
#
#   OUT_DIR=DIR bench/gpu_goodput.sh LAYOUT...     LAYOUT: PxD, e.g. 1x1 (2 GPUs), 2x2 1x3 3x1 (4)
#
# Each arm's fronts get 4 HTTP threads per GPU: the P/D gateway relays every token of every stream
# alone (4 × GPUs threads), each aggregated server its own share (4).
#
# Environment: PDSERVE (the binary, build/release/src/bin/pdserve), MODEL (synthetic:llama-3.1-8b),
# RATES (req/s, "2 4 8 12 16"), SECONDS_PER_RATE (20: requests = rate x this), INPUT (pdserve
# bench --input-len, normal:1024:384), OUTPUT (normal:128:32), SLO_TTFT_MS (1000), SLO_TPOT_MS (50),
# KV_MEMORY (per instance, 90GiB: an H200's 141 GB less the weights; about 50GiB on an 80 GB GPU),
# MAX_RUNNING (512: a lone decode GPU carries the running sequences of several aggregated ones, and
# a lower cap turns into queueing at its prefills), PREFILL_SLOTS (b_p of each prefill, 16). Writes
# OUT_DIR/<arm>_rate_<r>.json (one per bench process) and OUT_DIR/goodput.json, prints a table.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
B=${PDSERVE:-build/release/src/bin/pdserve}
out=${OUT_DIR:-build/bench/gpu_goodput}
mkdir -p "$out"
rm -f "$out"/*_rate_*.json "$out"/*_rate_*.txt "$out"/goodput.json  # the summary reads every result here
model=${MODEL:-synthetic:llama-3.1-8b}
rates=${RATES:-2 4 8 12 16}
secs=${SECONDS_PER_RATE:-20}
input=${INPUT:-normal:1024:384}
output=${OUTPUT:-normal:128:32}
slo_ttft=${SLO_TTFT_MS:-1000}
slo_tpot=${SLO_TPOT_MS:-50}
kv=${KV_MEMORY:-90GiB}
prefill_slots=${PREFILL_SLOTS:-16}
max_running=${MAX_RUNNING:-512}
# The same engine settings for every instance of both arms.
engine=(--kv-cache-memory "$kv" --max-context 8192 --max-running "$max_running" --step-token-budget 2048)
tokenizer=models/SmolLM2-135M-Instruct.Q4_1.gguf  # the tokenizer a synthetic model is served with
[ $# -ge 1 ] || { echo "usage: bench/gpu_goodput.sh PxD..." >&2; exit 2; }
gpus=$(nvidia-smi -L | grep -c "^GPU ")

pids=()
cleanup() {
  local pid  # not p: the layout loop below reads p and d after each arm
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
trap cleanup EXIT

# bench ARM RATE URL SEED: one pdserve bench run; its JSON at $out/ARM_rate_RATE[_SEED].json.
bench() {
  local arm=$1 rate=$2 url=$3 seed=$4 n
  n=$(python3 -c "print(max(1, round($rate * $secs)))")
  "$B" bench --base-url "$url" --api completions --input-len "$input" --output-len "$output" --ignore-eos \
    --arrival poisson --rate "$rate" -n "$n" --seed "$seed" --tokenizer-model "$tokenizer" \
    --slo-ttft-ms "$slo_ttft" --slo-tpot-ms "$slo_tpot" --client-threads 2 --metrics-interval 1 -q \
    --json "$out/${arm}_rate_${rate}_${seed}.json" >"$out/${arm}_rate_${rate}_${seed}.txt" 2>&1 || true
}

run_pd() {  # P D
  local p=$1 d=$2 arm="pd_${1}x${2}" cfg port=18400 i gpu=0
  cfg="$out/$arm.toml"
  {
    echo "model = \"$model\""
    echo 'transport = "cuda-ipc"'
    echo "[gateway]"
    echo "port = $port"
    echo "http_threads = $((4 * (p + d)))"
    echo "[instance_defaults]"
    echo "kv_cache_memory = \"$kv\""
    echo "max_context = 8192"
    echo "max_running = $max_running"
    echo "step_token_budget = 2048"
    echo "prefill_slots = $prefill_slots"
    for i in $(seq 1 "$p"); do
      printf '[[instance]]\nrole = "prefill"\nport = %d\ndevice = "cuda:%d"\n' $((port + gpu + 1)) $gpu
      gpu=$((gpu + 1))
    done
    for i in $(seq 1 "$d"); do
      printf '[[instance]]\nrole = "decode"\nport = %d\ndevice = "cuda:%d"\n' $((port + gpu + 1)) $gpu
      gpu=$((gpu + 1))
    done
  } >"$cfg"
  "$B" launch "$cfg" >"$out/$arm.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 240); do  # as wait_ready, but gives up at once when launch has stopped
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "${pids[-1]}" 2>/dev/null || { tail -5 "$out/$arm.log" >&2; exit 1; }
    sleep 0.5
  done
  wait_ready $port
  local seed=1
  for rate in $rates; do
    echo "== $arm: $rate req/s" >&2
    bench "$arm" "$rate" "http://127.0.0.1:$port" "$seed"
    seed=$((seed + 1))
  done
  cleanup
}

run_aggregated() {  # N
  local n=$1 arm="agg_$1" i ports=()
  for i in $(seq 0 $((n - 1))); do
    "$B" serve --mode aggregated --device "cuda:$i" --model "$model" --port $((18500 + i)) --http-threads 4 "${engine[@]}" \
      >"$out/${arm}_$i.log" 2>&1 &
    pids+=($!)
    ports+=($((18500 + i)))
  done
  wait_ready "${ports[@]}"
  local seed=1
  for rate in $rates; do
    echo "== $arm: $rate req/s over $n instances" >&2
    local share bpids=()
    share=$(python3 -c "print($rate / $n)")
    for i in $(seq 0 $((n - 1))); do
      # NOTE: seeds 1000 apart: each instance gets other prompts and arrival times.
      bench "$arm" "$share" "http://127.0.0.1:$((18500 + i))" $((seed + 1000 * i)) &
      bpids+=($!)
    done
    wait "${bpids[@]}"
    seed=$((seed + 1))
  done
  cleanup
}

done_agg=""
for layout in "$@"; do
  p=${layout%x*}
  d=${layout#*x}
  [ $((p + d)) -le "$gpus" ] || { echo "$layout needs $((p + d)) GPUs, this machine has $gpus" >&2; exit 2; }
  run_pd "$p" "$d"
  case " $done_agg " in *" $((p + d)) "*) ;; *) run_aggregated $((p + d)); done_agg="$done_agg $((p + d))" ;; esac
done

python3 - "$out" "$slo_ttft" "$slo_tpot" <<'EOF'
import glob, json, os, re, sys
out, ttft, tpot = sys.argv[1], sys.argv[2], sys.argv[3]
arms = {}
for f in sorted(glob.glob(os.path.join(out, "*_rate_*.json"))):
    m = re.match(r"(.+)_rate_([0-9.]+)_(\d+)\.json", os.path.basename(f))
    if not m:
        continue
    s = json.load(open(f))["runs"][0]["summary"]
    arm, share = m.group(1), float(m.group(2))
    n_inst = int(arm.split("_")[1]) if arm.startswith("agg_") else 1
    rate = round(share * n_inst, 6)
    a = arms.setdefault(arm, {}).setdefault(rate, {"goodput_rps": 0.0, "requests": 0, "ok": 0, "met": 0.0,
                                                   "ttft_p99_ms": 0.0, "tpot_p99_ms": 0.0})
    a["files"] = a.get("files", 0) + 1
    a["goodput_rps"] += s["goodput_rps"]
    a["requests"] += s["num_requests"]
    a["ok"] += s["num_ok"]
    a["met"] += s["slo_attainment"] * s["num_requests"]
    a["ttft_p99_ms"] = max(a["ttft_p99_ms"], s["ttft_ms"]["p99"])
    # Where requests queue (P/D arm, the gateway's view of its instances, scraped each second).
    for sample in json.load(open(f))["runs"][0].get("server_metrics_series", []):
        for k in ("pdserve_gateway_waiting", "pdserve_prefill_slots_in_use", "pdserve_decode_pending",
                  "pdserve_kv_pulls_in_flight", "pdserve_sequences_running"):
            v = sample["values"].get(k)
            if v is not None:
                a["peak_" + k[len("pdserve_"):]] = max(a.get("peak_" + k[len("pdserve_"):], 0), v)
    a["tpot_p99_ms"] = max(a["tpot_p99_ms"], s["tpot_ms"]["p99"])
print(f"goodput (req/s meeting TTFT <= {ttft} ms and TPOT <= {tpot} ms)")
print(f"{'arm':>10} {'rate':>6} {'goodput':>8} {'SLO %':>6} {'ok/sent':>9} {'TTFT p99':>9} {'TPOT p99':>9}")
for arm, rows in sorted(arms.items()):
    for rate, a in sorted(rows.items()):
        a["slo_attainment"] = a.pop("met") / max(1, a["requests"])
        n_inst = int(arm.split("_")[1]) if arm.startswith("agg_") else 1
        if a.pop("files") != n_inst:  # a bench run that wrote nothing (see its .txt)
            print(f"{arm:>10} {rate:>6g}  INCOMPLETE: results of {n_inst} bench runs expected")
            a["incomplete"] = True
            continue
        print(f"{arm:>10} {rate:>6g} {a['goodput_rps']:>8.2f} {100 * a['slo_attainment']:>6.1f} "
              f"{a['ok']:>4}/{a['requests']:<4} {a['ttft_p99_ms']:>9.0f} {a['tpot_p99_ms']:>9.1f}")
print("peaks of the queues each second (gateway waiting / prefill slots / decode pending / pulls / running):")
for arm, rows in sorted(arms.items()):
    for rate, a in sorted(rows.items()):
        peaks = [a.get("peak_" + k) for k in ("gateway_waiting", "prefill_slots_in_use", "decode_pending",
                                              "kv_pulls_in_flight", "sequences_running")]
        print(f"{arm:>10} {rate:>6g} " + " / ".join("-" if p is None else f"{p:g}" for p in peaks))
json.dump({arm: {str(r): v for r, v in rows.items()} for arm, rows in arms.items()},
          open(os.path.join(out, "goodput.json"), "w"), indent=1)
EOF
