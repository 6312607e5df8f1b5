#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default (synthetic world, BM25, SmolLM2-135M,
# GRPO on CPU). Extra arguments go to `searchrl train` (e.g. `bash scripts/run.sh --out runs/demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
searchrl train "$@"
