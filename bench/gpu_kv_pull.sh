#!/usr/bin/env bash
# KV transfer between a prefill and a decode process on two GPUs of one host, as deployed:
# `pdserve launch` with the prefill on cuda:0 and the decode on cuda:1, one request at a time
# (closed loop, one user) so that no two transfers overlap, prompts of each length in LENGTHS and
# one output token after the first. The decode instance times each pull from its request to the KV
# in its blocks (pdserve_kv_pull_seconds_total, pdserve_kv_pulled_bytes_total, read from the
# gateway's /metrics before and after); the script reports the mean pull time and bandwidth per
# length and transport, and the measured cudaMemcpyPeer bandwidth of the same GPUs
# (pdserve_gpu_bench --transfer-only) as the reference.
#
#   OUT_DIR=DIR bench/gpu_kv_pull.sh
#
# Environment: PDSERVE (build/release/src/bin/pdserve), GPU_BENCH (build/release/bench/pdserve_gpu_bench;
# empty: no reference), MODEL (synthetic:llama-3.1-8b), LENGTHS ("1024 4096"), N (requests per
# length, 12), TRANSPORTS ("cuda-ipc shm": shm stages through host memory).
# Writes OUT_DIR/kv_pull.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
out=${OUT_DIR:-build/bench/gpu_kv_pull}
mkdir -p "$out"
pdserve=${PDSERVE:-build/release/src/bin/pdserve}
gpu_bench=${GPU_BENCH-build/release/bench/pdserve_gpu_bench}
model=${MODEL:-synthetic:llama-3.1-8b}
lengths=${LENGTHS:-1024 4096}
n=${N:-12}
transports=${TRANSPORTS:-cuda-ipc shm}
tokenizer=models/SmolLM2-135M-Instruct.Q4_1.gguf  # the tokenizer a synthetic model is served with
trap stop_started EXIT

# counters PORT: "pulls bytes seconds" of the decode's KV pulls, from one read of the gateway's
# /metrics (one snapshot: three reads could straddle an update of the gateway's view).
counters() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk '
    $1 == "pdserve_kv_pulls_total" { p += $2 } $1 == "pdserve_kv_pulled_bytes_total" { b += $2 }
    $1 == "pdserve_kv_pull_seconds_total" { s += $2 } END { printf "%.0f %.0f %.9g\n", p, b, s }'
}
# settled PORT MIN: the counters once the pulls reach MIN (the gateway's view of the decode's
# counters lags its requests by up to a second), or after 15 s.
settled() {
  local c
  for _ in $(seq 1 60); do
    c=$(counters "$1")
    [ "${c%% *}" -ge "$2" ] && break
    sleep 0.25
  done
  echo "$c"
}

results="["
for transport in $transports; do
  cfg="$out/${transport}.toml"
  cat >"$cfg" <<EOF
model = "$model"
transport = "$transport"
[gateway]
port = 18700
[instance_defaults]
kv_cache_memory = "16GiB"
max_context = 8192
prefill_slots = 2
[[instance]]
role = "prefill"
port = 18701
device = "cuda:0"
[[instance]]
role = "decode"
port = 18702
device = "cuda:1"
EOF
  start "launch_${transport}.log" launch "$cfg"
  wait_ready 18700
  for len in $lengths; do
    # One warm-up request (first pulls open connections and map buffers), then the timed ones.
    before=$(counters 18700)
    "$pdserve" bench --base-url http://127.0.0.1:18700 --api completions --input-len "fixed:$len" \
      --output-len fixed:2 --ignore-eos --arrival closed --users 1 -n 1 --tokenizer-model "$tokenizer" -q \
      >/dev/null 2>&1 || true
    read -r pulls0 bytes0 secs0 <<<"$(settled 18700 $((${before%% *} + 1)))"
    "$pdserve" bench --base-url http://127.0.0.1:18700 --api completions --input-len "fixed:$len" \
      --output-len fixed:2 --ignore-eos --arrival closed --users 1 -n "$n" --tokenizer-model "$tokenizer" -q \
      --json "$out/${transport}_${len}.json" >"$out/${transport}_${len}.txt" 2>&1
    read -r pulls1 bytes1 secs1 <<<"$(settled 18700 $((pulls0 + n)))"
    row=$(python3 -c "
import json
p, b, s = $pulls1 - $pulls0, $bytes1 - $bytes0, $secs1 - $secs0
print(json.dumps({'transport': '$transport', 'prompt_tokens': $len, 'pulls': p, 'bytes': b, 'seconds': s,
                  'ms_per_pull': 1e3 * s / p if p else None, 'gbps': b / s / 1e9 if s else None}))")
    echo "$row"
    results+="${row},"
  done
  stop_started
  started_pids=()
  sleep 2
done
peer="null"
if [ -n "$gpu_bench" ] && [ -x "$gpu_bench" ]; then
  "$gpu_bench" --transfer-only --json "$out/gpu_bench_transfer.json" >"$out/gpu_bench_transfer.txt" 2>&1 || true
  peer=$(python3 -c "import json; print(json.load(open('$out/gpu_bench_transfer.json')).get('peer_gbps_0to1'))" 2>/dev/null || echo null)
fi
python3 - "$out" "${results%,}]" "$peer" <<'EOF'
import json, sys
out, rows, peer = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
peer = None if peer in ("null", "None", "") else float(peer)
print(f"{'transport':10} {'prompt':>7} {'pulls':>5} {'MiB/pull':>9} {'ms/pull':>8} {'GB/s':>6} {'of peer':>8}")
for r in rows:
    mib = r['bytes'] / r['pulls'] / 2**20 if r['pulls'] else 0
    share = f"{100 * r['gbps'] / peer:.0f} %" if peer and r['gbps'] else "-"
    print(f"{r['transport']:10} {r['prompt_tokens']:>7} {r['pulls']:>5.0f} {mib:>9.1f} {r['ms_per_pull'] or 0:>8.2f} "
          f"{r['gbps'] or 0:>6.1f} {share:>8}")
json.dump({"peer_gbps_0to1": peer, "rows": rows}, open(f"{out}/kv_pull.json", "w"), indent=1)
EOF
