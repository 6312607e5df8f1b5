#!/usr/bin/env bash
# The GPU checks still missing (issue #3: rollout throughput on a GPU; #4: RL step cost on a GPU),
# as one short run on a lent GPU machine, which has PyTorch and transformers but no package index.
#
#   bash scripts/gpu_check.sh prepare   # here, in the .venv: wheels the GPU image lacks
#                                       # (transformers 5.23, bm25s, PyStemmer) and the default
#                                       # model's tokenizer (not its weights) into .gpu/ (~15 MB,
#                                       # git-ignored through .git/info/exclude)
#   device tool: run command="bash scripts/gpu_check.sh run", carry=[".gpu"], timeout_s=560
#
# `run` installs the carried wheels into /tmp/site, then: the gpu-marked tests; the rollout
# benchmark with a random Qwen2.5-3B-shaped model in bf16 (batch 64, both schedules; random weights
# never write a stop string, so every turn ends at its budget and gets feedback); one GRPO step of
# the train benchmark with the same shape and LoRA. Output lines go to $OUT (else .gpu/out).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  set -e
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/whl
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .gpu/whl transformers==5.23.0 bm25s==0.3.16 PyStemmer==3.1.0
  src=$(python -c "from searchrl.models import ensure_default_cached; print(ensure_default_cached())")
  dst=.gpu/cache/models/$(basename "$src")
  mkdir -p "$dst"
  for f in tokenizer.json tokenizer_config.json chat_template.jinja config.json generation_config.json \
           searchrl-cache.json; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
  done
  SEARCHRL_CACHE=$PWD/.gpu/cache python -c "from searchrl.models import load_tokenizer; load_tokenizer()"
  du -sh .gpu
  ;;
run)
  out=${OUT:-.gpu/out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SEARCHRL_CACHE=$PWD/.gpu/cache \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  nvidia-smi -L | tee "$out/device.txt"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
    tests/test_generator.py tests/test_stream.py 2>&1 | tee "$out/tests.txt"
  timeout 240 python3 benchmarks/rollout.py --random-config qwen2.5-3b --device cuda --batch 64 \
    --questions 128 --kv-reuse on --skip-original 2>"$out/rollout.err" | tee "$out/rollout.jsonl"
  timeout 150 python3 benchmarks/train.py --random-config qwen2.5-3b --steps 1 model.device=cuda \
    model.dtype=bfloat16 model.lora_r=16 2>"$out/train.err" | tee "$out/train-lora.jsonl"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
