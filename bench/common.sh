# Shared by the benchmark scripts in bench/ (sourced, not run).

# wait_ready PORT...: waits up to 120 s for GET /health to answer 200 on each local PORT; exits
# the script with a message when one does not.
wait_ready() {
  local port
  for port in "$@"; do
    local ok=0
    for _ in $(seq 1 240); do
      if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.5
    done
    if [ "$ok" != 1 ]; then
      echo "the server on port $port did not become ready (see its log in ${out:-the output folder})" >&2
      exit 1
    fi
  done
}

# start LOG ARGS...: runs "$pdserve" ARGS in the background, its output in $out/LOG; stop_started
# (the scripts' EXIT trap) kills and reaps every process started so.
started_pids=()
start() {
  local log="$1"
  shift
  "$pdserve" "$@" >"$out/$log" 2>&1 &
  started_pids+=($!)
}
stop_started() {
  kill "${started_pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
