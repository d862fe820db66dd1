#!/usr/bin/env bash
# The H100 measurements of benchmarks/RESULTS.md, as one command for a lent GPU machine (shared/GPU.md).
#
#   bash scripts/benchmark_h100.sh fetch     # here (pip's registry): the wheels the GPU machine lacks, into .whl/ (git-ignored)
#   bash scripts/benchmark_h100.sh           # on the GPU machine (device call, carry [".whl"], timeout_s 600)
#
# The GPU machine has torch, transformers, accelerate and peft but no diffusers and no network. Every
# configuration appends its JSON line to $OUT/h100.jsonl as soon as it finishes, so a run cut short keeps what
# it measured; the most wanted configurations come first. Estimated 6-8 minutes, most of it compile warm-up.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata
fi

OUT=${OUT:-benchmark-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"

# SIZE=tiny PRECISION=fp32 runs the same sequence on a CPU in a few minutes: a dry run before spending GPU time.
B="python3 scripts/benchmark.py --size ${SIZE:-full} --precision ${PRECISION:-bf16} --steps 10 --warmup 3 --out $OUT/h100.jsonl"
# 1. eager: the issue's targets (LoRA batch 1 and 4; LoRA batch 1 with checkpointing for the 10 GB goal; full
#    batch 1 with checkpointing), then channels-last and the per-step VAE (what the latent cache saves).
$B --finetune lora --batch_size 1,4 --channels_last off,on
$B --finetune lora --batch_size 1 --gradient_checkpointing on
$B --finetune full --batch_size 1 --gradient_checkpointing on
$B --finetune lora --batch_size 4 --with_encoders vae
# 2. regional compile (warm-up in warmup_s), then CUDA graphs on top, then the batch that may fit best.
$B --finetune lora --batch_size 1,4 --compile
$B --finetune full --batch_size 1 --gradient_checkpointing on --compile
$B --finetune lora --batch_size 1 --compile reduce-overhead
$B --finetune lora --batch_size 8 --compile
python3 - "$OUT/h100.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{len(rows)} configurations, {sum('error' in r for r in rows)} failed")
EOF
