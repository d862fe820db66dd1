#!/usr/bin/env bash
# A full UNet fine-tune of SDXL base with the debiased loss, for a GPU machine with Hub access (~50 GB VRAM in
# bf16 with gradient checkpointing; see the README for multi-GPU and 24 GB options).
# lambdalabs/pokemon-blip-captions was taken down from the Hub; lambdalabs/naruto-blip-captions has the same
# layout. Pick another with DATASET=... (a Hub id or a local folder).
#   bash scripts/train_pokemon_full.sh [extra flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET:-lambdalabs/naruto-blip-captions}
OUT=${OUT:-sdxl-debias-full}
accelerate launch -q train_sdxl_debias.py \
  --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
  --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
  --dataset "$DATASET" \
  --resolution 1024 --center_crop --random_flip \
  --finetune full \
  --loss_weighting debias \
  --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 10000 \
  --learning_rate 1e-5 --lr_scheduler constant --lr_warmup_steps 0 \
  --mixed_precision bf16 --gradient_checkpointing \
  --checkpointing_steps 1000 --checkpoints_total_limit 2 \
  --validation_prompt "a man with a scarf and a hat, ninja style" --validation_steps 1000 \
  --output_dir "$OUT" --seed 42 "$@"
