#!/usr/bin/env bash
# Slow tier: the server tests under ThreadSanitizer. Builds `pdserve` and `api_test` with the
# `tsan` preset (build/tsan), runs the API unit tests, then the whole end-to-end suite against
# the TSan build of the server. Any data race report fails the run (halt_on_error: the server
# aborts, so its exit status and the client's requests fail).
#   tests/e2e/run_tsan.sh [pytest args, default: tests/e2e]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
echo "run_tsan: building pdserve and api_test (preset tsan)"
cmake --preset tsan >/dev/null
cmake --build build/tsan --target pdserve api_test | tail -n 1
echo "run_tsan: api_test"
build/tsan/src/api/api_test --gtest_brief=1
echo "run_tsan: e2e suite against build/tsan/src/bin/pdserve"
if [ $# -eq 0 ]; then set -- tests/e2e; fi
PDSERVE_BIN="$root/build/tsan/src/bin/pdserve" .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
