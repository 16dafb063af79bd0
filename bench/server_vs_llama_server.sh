#!/usr/bin/env bash
# pdserve serve --mode aggregated vs llama.cpp's llama-server (same source package as the
# reference, 32 slots, continuous batching) on the default model, measured with pdserve bench's
# A/B mode (the same requests on both servers, alternating), same machine, same thread count.
#
#   bench/server_vs_llama_server.sh [OUT_DIR]      (prerequisites: make build and
#                                                    tools/reference/build_llama_cpp.sh)
#
# Environment: THREADS (2), N_SAT (requests at saturation, 100; 0 skips it), RATE_SAT (req/s, 4),
# N_MOD (requests at the moderate rate, 30), RATE_MOD (req/s, 0.25), IDLE_CONNS (500).
# Writes OUT_DIR/{saturation,moderate}.json and prints the tables and the memory figures.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/common.sh
out="${1:-build/bench/server}"
mkdir -p "$out"
threads="${THREADS:-2}"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
pdserve=build/release/src/bin/pdserve
llama=build/reference/llama.cpp-build/bin/llama-server
for f in "$model" "$pdserve" "$llama"; do
  [ -e "$f" ] || { echo "missing $f: run make build and tools/reference/build_llama_cpp.sh" >&2; exit 1; }
done
port_a=18180
port_b=18181

"$pdserve" serve --mode aggregated --model "$model" --port "$port_a" --threads "$threads" --max-running 32 \
  >"$out/pdserve.log" 2>&1 &
pid_a=$!
"$llama" -m "$model" --port "$port_b" -t "$threads" -tb "$threads" -np 32 -c 16384 -cb --log-disable \
  >"$out/llama-server.log" 2>&1 &
pid_b=$!
trap 'kill $pid_a $pid_b 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_ready "$port_a" "$port_b"

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "idle RSS after start: pdserve $(rss_kib $pid_a) KiB, llama-server $(rss_kib $pid_b) KiB"

# Resident memory per idle connection: open IDLE_CONNS keep-alive connections to each server.
idle_conns="${IDLE_CONNS:-500}"
for pair in "pdserve $pid_a $port_a" "llama-server $pid_b $port_b"; do
  set -- $pair
  before=$(rss_kib "$2")
  python3 - "$3" "$idle_conns" <<'EOF' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
time.sleep(4)
EOF
  holder=$!
  sleep 3
  after=$(rss_kib "$2")
  wait "$holder" || true
  echo "$1: RSS $before KiB idle, $after KiB with $idle_conns idle connections: $(( (after - before) * 1024 / idle_conns )) bytes per connection"
done

common=(--base-url "http://127.0.0.1:$port_a" --ab-base-url "http://127.0.0.1:$port_b" --ab-rounds 1
        --api completions --input-len normal:256:32 --output-len normal:128:16 --arrival poisson
        --tokenizer-model "$model" --slo-ttft-ms 2000 --slo-tpot-ms 200 --no-metrics -q)
if [ "${N_SAT:-100}" != 0 ]; then  # N_SAT=0 skips the saturation run
  echo "== saturation: ${N_SAT:-100} requests, Poisson ${RATE_SAT:-4} req/s"
  "$pdserve" bench "${common[@]}" -n "${N_SAT:-100}" --rate "${RATE_SAT:-4}" --json "$out/saturation.json"
fi
echo "== moderate: ${N_MOD:-30} requests, Poisson ${RATE_MOD:-0.25} req/s"
"$pdserve" bench "${common[@]}" -n "${N_MOD:-30}" --rate "${RATE_MOD:-0.25}" --json "$out/moderate.json"
echo "peak RSS during the runs: pdserve $(awk '/VmHWM/ {print $2}' /proc/$pid_a/status) KiB," \
  "llama-server $(awk '/VmHWM/ {print $2}' /proc/$pid_b/status) KiB"
