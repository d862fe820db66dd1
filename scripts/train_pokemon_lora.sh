#!/usr/bin/env bash
# A real LoRA fine-tune of SDXL base with the debiased loss, for a GPU machine with Hub access (~16 GB VRAM).
# lambdalabs/pokemon-blip-captions was taken down from the Hub; lambdalabs/naruto-blip-captions has the same
# layout (image + BLIP "text" column). Pick another with DATASET=... (a Hub id or a local folder).
#   bash scripts/train_pokemon_lora.sh [extra flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET:-lambdalabs/naruto-blip-captions}
OUT=${OUT:-sdxl-debias-lora}
accelerate launch -q train_sdxl_debias.py \
  --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
  --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
  --dataset "$DATASET" \
  --resolution 1024 --random_flip \
  --finetune lora --rank 4 \
  --loss_weighting debias \
  --train_batch_size 1 --gradient_accumulation_steps 4 --num_train_epochs 2 \
  --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 \
  --mixed_precision fp16 \
  --checkpointing_steps 500 --checkpoints_total_limit 3 \
  --validation_prompt "a man with a scarf and a hat, ninja style" --validation_steps 500 \
  --output_dir "$OUT" --seed 42 "$@"
