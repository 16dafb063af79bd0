#!/usr/bin/env bash
# The gateway's cost of relaying many open streams: one prefill and one decode instance (separate
# processes, shared-memory KV), a gateway over them, and USERS closed-loop users each sending one
# streamed request (short prompt, OUTPUT tokens with ignore_eos), so that up to USERS streams are
# open at the gateway at once. Samples the gateway's thread count every 0.2 s and reads its CPU
# time before and after. GATEWAYS lists the pdserve binaries to run the gateway with (the
# instances and the load generator are always $PDSERVE), in turn, ROUNDS times: put an older build
# there to compare.
#
#   bench/gateway_relay.sh [OUT_DIR]        (prerequisite: make build)
#
# Environment: USERS (400), OUTPUT (32), ROUNDS (2), GATEWAYS ($PDSERVE), PDSERVE
# (build/release/src/bin/pdserve), STREAM_THREADS (passed as --stream-threads when set: a gateway
# binary without the flag refuses it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
out="${1:-build/bench/gateway_relay}"
mkdir -p "$out"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
pdserve="${PDSERVE:-build/release/src/bin/pdserve}"
for f in "$model" "$pdserve"; do
  [ -e "$f" ] || { echo "missing $f: run make build" >&2; exit 1; }
done
users="${USERS:-400}"
output="${OUTPUT:-32}"
rounds="${ROUNDS:-2}"
read -r -a gateways <<<"${GATEWAYS:-$pdserve}"
extra=()
[ -n "${STREAM_THREADS:-}" ] && extra=(--stream-threads "$STREAM_THREADS")

trap stop_started EXIT

instance=(instance --model "$model" --threads 1 --transport shm --kv-cache-memory 512MiB)
start prefill.log "${instance[@]}" --role prefill --prefill-slots 8 --port 18501
start decode.log "${instance[@]}" --role decode --max-running 256 --port 18502
wait_ready 18501 18502

cpu_seconds() {  # utime + stime of PID
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}'
}
now() { date +%s.%N; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a - b}'; }
threads_of() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }

printf '%-40s %5s %12s %12s %16s %8s\n' gateway round "idle threads" "peak threads" "gateway CPU (s)" "wall (s)"
for round in $(seq 1 "$rounds"); do
  for g in "${gateways[@]}"; do
    "$g" gateway --model "$model" --prefill 127.0.0.1:18501 --decode 127.0.0.1:18502 --port 18510 \
      "${extra[@]}" >"$out/gateway.log" 2>&1 &
    gpid=$!
    wait_ready 18510
    idle=$(threads_of "$gpid")
    echo 0 >"$out/peak"
    (
      peak=0
      while kill -0 "$gpid" 2>/dev/null; do
        n=$(threads_of "$gpid" 2>/dev/null || echo 0)
        [ "${n:-0}" -gt "$peak" ] && peak=$n && echo "$peak" >"$out/peak"
        sleep 0.2
      done
    ) &
    sampler=$!
    c0=$(cpu_seconds "$gpid")
    t0=$(now)
    "$pdserve" bench --base-url http://127.0.0.1:18510 --arrival closed --users "$users" -n "$users" \
      --input-len fixed:16 --output-len "fixed:$output" --ignore-eos --json "$out/bench_${round}.json" \
      >"$out/bench.log" 2>&1
    wall=$(minus "$(now)" "$t0")
    c1=$(cpu_seconds "$gpid")
    kill "$gpid"
    wait "$gpid" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    printf '%-40s %5s %12s %12s %16s %8.1f\n' "$g" "$round" "$idle" "$(cat "$out/peak")" \
      "$(minus "$c1" "$c0")" "$wall"
  done
done
