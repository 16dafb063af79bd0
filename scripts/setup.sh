#!/usr/bin/env bash
# One-time and idempotent set-up for a fresh Debian 12 machine: Debian packages, the Python
# test venv, and the default model. Re-running it when everything is in place takes seconds.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf 'setup: %s\n' "$*" >&2; }

# 1. Debian packages ---------------------------------------------------------------------------
missing=()
while read -r pkg; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done < scripts/deps.txt
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  # Packages with daemons (prometheus: we only need its promtool) must not start them: a
  # policy-rc.d that refuses every service start, for the duration of the install only.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    made_policy=1
  fi
  ok=1
  if ! "${sudo_cmd[@]}" apt-get update -qq || \
     ! DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    ok=0
  fi
  [ "$made_policy" -eq 0 ] || "${sudo_cmd[@]}" rm -f "$policy"
  if [ "$ok" -eq 0 ]; then
    say "could not install ${missing[*]}: install them with apt-get (needs root and network) and re-run"
    exit 1
  fi
fi

# 2. Python venv for test tools ----------------------------------------------------------------
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating Python venv for test tools in .venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt || {
    say "pip could not install scripts/requirements-test.txt: check the network or a PyPI mirror (PIP_INDEX_URL) and re-run"
    exit 1
  }
  echo "$want" > "$stamp"
fi

# 3. The default model -------------------------------------------------------------------------
scripts/fetch_model.sh
