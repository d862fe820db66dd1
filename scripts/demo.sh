#!/usr/bin/env bash
# The offline demo: build a tiny random SDXL and a synthetic shapes dataset, then train a debiased LoRA on them
# on the CPU, end to end, through the same script and flags you would use on real SDXL.
#   bash scripts/demo.sh [OUT]        (default OUT: ./demo-out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-out}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$OUT/hf-datasets-cache}

[ -f "$OUT/tiny-sdxl/model_index.json" ] || python scripts/make_tiny_sdxl.py "$OUT/tiny-sdxl"
[ -f "$OUT/shapes/train/metadata.jsonl" ] || python scripts/make_shapes_dataset.py "$OUT/shapes"

start=$(date +%s)
accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_sdxl_debias.py \
  --pretrained_model_name_or_path "$OUT/tiny-sdxl" \
  --dataset "$OUT/shapes" \
  --output_dir "$OUT/lora" --overwrite_output_dir \
  --resolution 64 --random_flip \
  --finetune lora --rank 4 \
  --loss_weighting debias \
  --train_batch_size 4 --max_train_steps 60 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 5 \
  --checkpointing_steps 30 --checkpoints_total_limit 1 --logging_steps 5 \
  --validation_prompt "a red circle on a blue background" --num_validation_images 2 \
  --validation_steps 30 --validation_inference_steps 10 \
  --report_to none --seed 0
echo
echo "demo finished in $(( $(date +%s) - start )) s of training. Outputs in $OUT/lora:"
echo "  LoRA (diffusers format): $OUT/lora/pytorch_lora_weights.safetensors"
echo "  LoRA (kohya format, for A1111/ComfyUI): $OUT/lora/lora.safetensors"
echo "  model card: $OUT/lora/README.md   resolved flags: $OUT/lora/train_config.json"
echo "  metrics, one JSON row per logged step: $OUT/lora/metrics.jsonl"
echo "  validation grids (step 0 = the base model): $OUT/lora/samples/"
[ -f "$OUT/lora/loss.png" ] && echo "  loss curve and loss by timestep: $OUT/lora/loss.png"
echo "  resumable checkpoint: $(ls -d "$OUT"/lora/checkpoint-* | tail -n 1)"
