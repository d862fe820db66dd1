#!/usr/bin/env bash
# The H100 measurements of benchmarks/RESULTS.md, as one command for a GPU machine without network.
#
#   bash scripts/benchmark_h100.sh fetch     # here (pip's registry): the wheels the GPU machine lacks, into .whl/ (git-ignored)
#   bash scripts/benchmark_h100.sh [open|measured|all]   # on the GPU machine (device call, carry [".whl"])
#
# The targets are ratios to diffusers' examples measured on an H100 (../shared/GPU.md): name the kind
# nvidia-h100-x1 in the device call, since a call without a kind may land on an H200 (faster memory), whose
# numbers compare with no reference. The JSON lines and $OUT/gpu.txt name the card either way.
#
# Compiling is most of a GPU session's time (205 s cold for LoRA batch 1 with whole Transformer2DModel graphs,
# 49 s with inductor's on-disk cache warm). The run leaves that cache in $OUT/inductor-cache.tar.gz (when it is
# under the 16 MiB a returned file may have); put it in .inductor-cache/ here (git-ignored) and add
# ".inductor-cache" to carry, and the next machine of the same torch starts with it (on the CPU: 117 -> 13 s).
#
# The GPU machine has torch, transformers, accelerate and peft but no diffusers and no network. Every
# configuration appends its JSON line to $OUT/h100.jsonl as soon as it finishes, so a run cut short keeps what
# it measured; the most wanted configurations come first. It stops itself after BUDGET_S seconds.
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
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # (Triton's kernels go under it too)
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
if [ -f .inductor-cache/inductor-cache.tar.gz ]; then
  tar -xzf .inductor-cache/inductor-cache.tar.gz -C "$TORCHINDUCTOR_CACHE_DIR" && echo "inductor cache: carried one in use"
fi

# SIZE=tiny PRECISION=fp32 runs the same sequence on a CPU in a few minutes: a dry run before spending GPU time.
B="python3 scripts/benchmark.py --size ${SIZE:-full} --precision ${PRECISION:-bf16} --steps 10 --warmup 3 --out $OUT/h100.jsonl"
# Every invocation gets what is left of BUDGET_S (default 540 s, inside a 600 s device call), so a slow compile
# costs only the configurations after it; one with under 20 s left is skipped.
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
# The cache as of the last configuration that ran to its end: one stopped by the time limit in the middle of a
# compile leaves truncated files, which the next machine would fail to load ("file too short").
# Once a snapshot is too large to come back, or a run was killed (its files may be cut short), none is taken again.
SNAPSHOT=1
save_cache() {
  [ "$SNAPSHOT" = 1 ] || return
  if ! tar -czf "$OUT/cache.tmp" -C "$TORCHINDUCTOR_CACHE_DIR" .; then
    rm -f "$OUT/cache.tmp"
  elif [ "$(stat -c %s "$OUT/cache.tmp")" -gt $(( 16 * 1024 * 1024 )) ]; then
    echo "inductor cache: $(du -h "$OUT/cache.tmp" | cut -f1), too large to come back; no more snapshots"
    rm -f "$OUT/cache.tmp"
    SNAPSHOT=0
  else
    mv "$OUT/cache.tmp" "$OUT/inductor-cache.tar.gz"
  fi
}
run() {
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "skipped (time): $*"; return; fi
  echo "== $* (${left} s left)"
  timeout "$left" $B "$@"
  local status=$?
  [ "$status" -ne 0 ] && echo "ended with status $status: $*"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then SNAPSHOT=0; else save_cache; fi
}
# What runs: `open` (the default) measures what no session has yet, most wanted first; `measured` repeats the
# configurations whose numbers benchmarks/RESULTS.md gives (device calls of 2026-11-26 and 27); `all` both.
PART=${1:-open}
if [ "$PART" = open ] || [ "$PART" = all ]; then
  # The MFU stretch goal (40 %): batch 8 ran 39.6 %, batch 10 39.3 %. Channels-last convolutions at batch 8: the
  # batch-4 profile shows cuDNN's NCHW->NHWC transposes around every convolution. Its cold compile did not finish
  # in 255 s on 2026-11-27 (third session): give it a call of its own, or a warm inductor cache.
  run --finetune lora --batch_size 8 --compile reduce-overhead --compile_scope transformers --channels_last on --steps 8
  # The same full fine-tune as in `measured` with the default scope (a shorter compile), then the 10 GB LoRA under CUDA graphs.
  run --finetune full --batch_size 1 --gradient_checkpointing on --compile reduce-overhead --profile 3
  run --finetune lora --batch_size 1 --gradient_checkpointing on --compile reduce-overhead --compile_scope transformers
  run --finetune lora --batch_size 1 --compile reduce-overhead --compile_scope stages
  run --finetune full --batch_size 1 --compile reduce-overhead --compile_scope transformers
  # Channels-last convolutions once the GPU is the bottleneck (the profile of batch 4 shows cuDNN's NCHW->NHWC
  # transposes around every convolution). (cuDNN's autotuner changed nothing at batch 8: in `measured`.)
  run --finetune lora --batch_size 4 --compile reduce-overhead --channels_last on --profile 3
  run --finetune lora --batch_size 4 --with_encoders vae
fi
if [ "$PART" = measured ] || [ "$PART" = all ]; then
  [ "${SIZE:-full}" = full ] && { timeout 60 python3 scripts/sdpa_kernels.py | tee "$OUT/sdpa.txt"; }
  run --finetune lora --batch_size 1,4 --profile 3
  run --finetune lora --batch_size 4 --sdpa_backend cudnn --profile 3
  run --finetune lora --batch_size 1 --compile reduce-overhead --profile 3
  run --finetune lora --batch_size 1 --compile reduce-overhead --compile_scope transformers
  run --finetune full --batch_size 1 --gradient_checkpointing on --profile 3
  run --finetune lora --batch_size 4 --compile reduce-overhead --profile 3
  # 2026-11-27 (second GPU session): the full fine-tune's target met, and the MFU rows.
  run --finetune full --batch_size 1 --gradient_checkpointing on --compile reduce-overhead --compile_scope transformers --profile 3
  run --finetune lora --batch_size 4,8 --compile reduce-overhead --compile_scope transformers
  run --finetune lora --batch_size 8 --compile reduce-overhead --compile_scope transformers --cudnn_benchmark on
  # 2026-11-27 (third): the full fine-tune's wall-clock rate over 30 steps (ms_steps, gc_ms_steps, gc_full_ms),
  # and the largest LoRA batch that fits 80 GB.
  run --finetune full --batch_size 1 --gradient_checkpointing on --compile reduce-overhead --compile_scope transformers --steps 30
  run --finetune lora --batch_size 10 --compile reduce-overhead --compile_scope transformers
  # CUDA graphs with gradient accumulation: the later micro-batches add to gradients left in the graphs' pool.
  run --finetune lora --batch_size 1 --compile reduce-overhead --gradient_accumulation_steps 2 --steps 3 --warmup 2
fi
python3 - "$OUT/h100.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, "scripts")
from benchmark import print_table
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except FileNotFoundError:
    rows = []
if not rows:
    sys.exit("no configuration finished")
print_table(rows)
print(f"{len(rows)} configurations, {sum('error' in r for r in rows)} failed")
for r in rows:
    print(r["finetune"], r["batch_size"], r.get("compile_mode") if r.get("compile") else "eager",
          "graphs", r.get("compiled_graphs"), "breaks", r.get("graph_breaks"), "sync sites", r.get("sync_sites"))
    if "profile" in r:
        print("   ", json.dumps(r["profile"])[:600])
EOF
