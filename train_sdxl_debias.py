#!/usr/bin/env python
"""Fine-tune Stable Diffusion XL (LoRA or the full UNet) with the debiased estimation loss.

    accelerate launch train_sdxl_debias.py --dataset lambdalabs/naruto-blip-captions --output_dir out

The loss weights each sample's MSE by a function of its timestep's SNR (see loss.py): by default 1/√SNR for
ε-prediction ("Debias the Training of Diffusion Models", arXiv:2310.08442). Everything else follows diffusers'
SDXL example scripts: the same flag names, the same output layout, the same SDXL conditioning.

The file reads top to bottom in nine sections: 1 arguments, 2 models, 3 data, 4 conditioning, 5 cache,
6 step, 7 checkpoints, 8 observe, 9 main. Heavy libraries (diffusers, transformers, datasets, peft, accelerate)
are imported inside the sections that use them, so a bad flag is reported in a second, not after ten.
"""
import argparse
import collections
import csv
import errno
import functools
import gc
import glob
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import signal
import socket
import sys
import tarfile
import time
import unicodedata
import warnings
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass

try:  # Ctrl-C while torch loads (seconds on a cold disk): nothing has started, so one line, not a traceback
    import numpy as np
    import torch
    from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

    import loss as debias_loss
except KeyboardInterrupt:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once (torchrun passes the Ctrl-C to every process)
        print("\ninterrupted while loading torch: nothing had started", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

logger = logging.getLogger("train_sdxl_debias")
EVERY_PROCESS = {"every_process": True}  # a warning about what only this process sees (others say theirs once)


class UserError(Exception):
    """A problem the user can fix (a path, a column, a flag). Reported as one line, no traceback."""


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss keeps diverging); reported like a UserError, exit code 3."""


def derive_seed(*parts):
    """A 63-bit seed that is a pure function of `parts` (seed, epoch, step, ...): resumable, worker-independent."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# 1. arguments
# ----------------------------------------------------------------------------------------------------------------

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


class Parser(argparse.ArgumentParser):
    """A bad value ends in one `error:` line, like every other mistake, not a usage dump; and no flag is taken
    for a prefix of another (kohya's --sdpa as --sdpa_backend, --noise as --noise_offset)."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def add_argument(self, *names, **kw):  # --help shows each default that its text does not already give
        default, text = kw.get("default"), kw.get("help") or ""
        if default is not None and default is not False and text != argparse.SUPPRESS and "default" not in \
                text.lower():  # (a default of 0 is shown; % is argparse's format character)
            kw["help"] = f"{text} (default: {str(default).replace('%', '%%')})".strip()
        return super().add_argument(*names, **kw)


def side(value):
    """--resolution: one side, or kohya's "1024,1024" (square only: other shapes are what buckets are for)."""
    value = str(value)  # (a --config file's 1024 is an int, or 1024.0; validate() then checks the range)
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    sides = {int(n) for n in numbers if n.is_integer()}
    if len(numbers) not in (1, 2) or len(sides) != 1 or not all(n.is_integer() for n in numbers):
        raise argparse.ArgumentTypeError(f"{value!r} is not one number, the side of square training images (for "
                                         "other shapes add --aspect_ratio_bucketing, whose buckets keep its area)")
    return sides.pop()


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", default=SDXL_BASE,
      help="Hub id or local folder of an SDXL pipeline, or one SDXL checkpoint file (.safetensors or .ckpt, as "
           "A1111/Forge, ComfyUI and kohya's scripts use them).")
    a("--single_file_config", default=None,
      help="For a checkpoint file: a Hub id or folder of a diffusers SDXL pipeline whose configs and tokenizers "
           "match it (default: what diffusers infers from the file, stabilityai/stable-diffusion-xl-base-1.0 for "
           "SDXL base, fetched once from the Hub; its weights are not downloaded).")
    a("--pretrained_vae_model_name_or_path", default=None,
      help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix (then it may run in fp16): "
           "a Hub id or folder, or one VAE file in the original layout (sdxl_vae.safetensors).")
    a("--revision", default=None)
    a("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    a("--cache_dir", default=None, help="Where Hub downloads (models and datasets) are cached, as in diffusers' "
                                        "scripts (default: the Hugging Face cache).")
    # data
    a("--dataset", "--dataset_name", dest="dataset", default=None,
      help="Hub dataset id, a local folder (imagefolder with metadata.jsonl/csv, images + same-name .txt, kohya's "
           "<repeats>_<words> folders, a downloaded or saved dataset) or one .parquet/.arrow/.jsonl/.csv file.")
    a("--dataset_config_name", default=None)
    a("--dataset_split", default=None, help="The split to train on: of a Hub dataset, its downloaded files, a "
      "save_to_disk folder, or a folder's split folders (val/ is validation). Default: train, or the only split.")
    a("--train_data_dir", default=None, help="Local folder of training images (same layouts as --dataset).")
    a("--image_column", default=None, help=f"Default: the first of {', '.join(IMAGE_COLUMNS)}, else the one column "
      "of images.")
    a("--caption_column", default=None, help=f"Default: the first of {', '.join(CAPTION_COLUMNS)}.")
    a("--caption_extension", type=lambda ext: "." + ext.strip().lstrip("."), default=None,  # "txt" = ".txt"
      help="Folders of images + caption files: read only captions with this extension, e.g. .caption (kohya's "
           "flag; default: a same-name .txt, else .caption).")
    a("--max_train_samples", type=int, default=None, help="Train on a seeded random subset of this size.")
    a("--resolution", type=side, default=1024, help="Training size (square; the bucket area with bucketing).")
    a("--center_crop", action="store_true", help="Center crop (default: random crop).")
    a("--random_flip", action="store_true")
    a("--dataloader_num_workers", type=int, default=None,
      help="Image-decoding processes (default: the CPUs per process less one, at most 8; none while training "
           "from cached latents, which need no decoding).")
    a("--caption_dropout", "--proportion_empty_prompts", dest="caption_dropout", type=float, default=0.0,
      help="Probability of training on an empty prompt (for classifier-free guidance).")
    a("--shuffle_caption", action="store_true",
      help="Shuffle each caption's comma-separated tags every time it is drawn (kohya's flag, for tag captions); "
           "captions are then encoded every step instead of cached.")
    a("--keep_tokens", type=int, default=0,
      help="With --shuffle_caption: the first N tags stay in front, e.g. a trigger word (kohya's flag).")
    a("--aspect_ratio_bucketing", action="store_true",
      help="Batch images by aspect ratio (SDXL's ~1 MP buckets scaled to --resolution) instead of square crops.")
    a("--cache_latents", action="store_true", help="VAE-encode every image (and flip) once, to --data_cache_dir.")
    a("--no_text_cache", action="store_true",
      help="Encode captions every step instead of caching their embeddings (e.g. millions of unique captions).")
    a("--data_cache_dir", default=None,
      help="Folder of the cached latents and text embeddings (default: <output_dir>/cache).")
    a("--cache_batch_size", type=int, default=8, help="Images per VAE call while building the cache.")
    # what to train
    a("--finetune", choices=("lora", "full"), default="lora")
    a("--rank", type=int, default=None, help="LoRA rank (default 4).")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    a("--lora_dropout", type=float, default=None, help="Default 0.")
    a("--lora_target_modules", default=None,
      help="Comma-separated UNet module names (default to_q,to_k,to_v,to_out.0: the attention projections).")
    a("--use_dora", action="store_const", const=True, default=None, help="Weight-decomposed LoRA (peft DoRA).")
    a("--init_lora_weights", choices=sorted(INIT_LORA_WEIGHTS), default=None, help="Default gaussian.")
    a("--network_weights", default=None,
      help="Start from this LoRA instead of a new one (kohya's flag): a .safetensors in kohya's or diffusers' "
           "format, or an output folder of this trainer. Its rank, alpha and layers are the run's.")
    a("--train_text_encoder", action="store_true", help="Also train LoRA adapters on both text encoders.")
    a("--text_encoder_lr", type=float, default=None, help="Default: --learning_rate.")
    a("--use_ema", action="store_true", help="Full fine-tune: keep an EMA of the UNet for validation and saving.")
    a("--ema_decay", type=float, default=0.9999)
    # loss
    a("--loss_weighting", choices=debias_loss.WEIGHTINGS, default=None,
      help="Default debias; min_snr when --snr_gamma is given (as it is in diffusers' scripts).")
    a("--snr_gamma", type=float, default=None, help="γ of --loss_weighting min_snr (default 5).")
    a("--prediction_type", choices=debias_loss.PREDICTION_TYPES, default=None,
      help="Default: the scheduler's (epsilon for SDXL base).")
    a("--normalize_loss_weights", action="store_true",
      help="Divide the weights by their mean over the training timesteps, so the loss (and lr, clipping) keep "
           "plain MSE's scale. SDXL's mean ε-debias weight is ≈ 3.0.")
    a("--noise_offset", type=float, default=0.0)
    a("--input_perturbation", type=float, default=0.0, help="Noise the noise: arXiv:2301.11706 (0.1 typical).")
    a("--min_timestep", type=int, default=0, help="Train on timesteps in [min_timestep, max_timestep).")
    a("--max_timestep", type=int, default=None, help="Default: the scheduler's num_train_timesteps.")
    # optimisation
    a("--train_batch_size", type=int, default=1, help="Per device.")
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=1e-4)
    a("--scale_lr", action="store_true", help="Multiply the lr by batch size × accumulation × processes.")
    a("--lr_scheduler", default="constant",
      choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"))
    a("--lr_warmup_steps", type=int, default=0, help="In optimizer steps.")
    a("--lr_num_cycles", "--lr_scheduler_num_cycles", dest="lr_num_cycles", type=int, default=1,
      help="cosine_with_restarts: how many cosine decays (hard restarts) the run has.")
    a("--lr_power", "--lr_scheduler_power", dest="lr_power", type=float, default=1.0,
      help="polynomial: the decay's power (1: linear).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0,
      help="Gradient clipping; 0: none (the norm is still logged). With DeepSpeed its config's gradient_clipping "
           "decides.")
    a("--max_nonfinite_steps", type=int, default=5,
      help="Stop after this many optimizer steps in a row with a NaN/Inf loss or gradient (each is skipped).")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
      help="Default: accelerate config's choice.")
    a("--optimizer", choices=("adamw", "adamw8bit", "adafactor", "prodigy"), default="adamw",
      help="adamw8bit needs bitsandbytes, prodigy needs prodigyopt (use --learning_rate 1 with it).")
    a("--gradient_checkpointing", action="store_true")
    a("--compile", action="store_true",
      help="torch.compile the UNet's repeated blocks (transformer and resnet blocks), not the whole UNet: "
           "the same speed-up for a fraction of the warm-up.")
    a("--compile_mode", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
      default="default",
      help="torch.compile's mode for --compile. reduce-overhead adds CUDA graphs, which remove the host's launch "
           "overhead: the fastest measured (H100, batch 4: 19.3 img/s, 3.6x diffusers' LoRA example), for runs "
           "with one image size (with --aspect_ratio_bucketing each bucket compiles and records its own graphs).")
    a("--compile_scope", choices=("blocks", "transformers", "stages"), default="blocks",
      help="What --compile makes graphs of: each transformer and resnet block (blocks: the shortest warm-up), each "
           "Transformer2DModel whole (transformers: fewer, larger CUDA graphs; H100, LoRA batch 1, reduce-overhead: "
           "8.3-10.4 img/s against 6.3 for blocks, but 205 s of first compile against 58), or each down/mid/up block "
           "(stages).")
    a("--channels_last", action="store_true",
      help="Keep the UNet's 4-D weights and activations channels-last (NHWC), the layout cuDNN's half-precision "
           "convolutions prefer. Check it pays on your card: scripts/benchmark.py --channels_last off,on.")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    a("--sdpa_backend", choices=("auto", "flash", "cudnn", "efficient", "math"), default="auto",
      help="The kernel PyTorch's scaled_dot_product_attention tries first (it falls back to the others for "
           "shapes that one cannot take); auto: PyTorch's own order. On an H100 cuDNN's kernel ran SDXL's "
           "4096-token attention 2.1x as fast as flash (torch 2.11 picks it on its own there); try cudnn where "
           "your torch prefers flash: scripts/sdpa_kernels.py shows what each kernel does on your card.")
    a("--seed", type=int, default=0)
    # outputs
    a("--output_dir", default="sdxl-debias-model")
    a("--overwrite_output_dir", action="store_true",
      help="Start afresh in an output_dir that holds another run's checkpoints (they are deleted).")
    a("--logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    a("--report_to", default=None, help="tensorboard, wandb, all or none (default: tensorboard if installed).")
    a("--logging_steps", type=int, default=10, help="Log metrics every N optimizer steps.")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest' in output_dir.")
    a("--validation_prompt", action="append", default=None, help="Repeat for several prompts.")
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, default=500)
    a("--validation_inference_steps", type=int, default=25)
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_token", default=None, help="Prefer `hf auth login`: a token here is refused with a tracker.")
    a("--save_single_file", action="store_true",
      help="Full fine-tune: also write the whole model as one <output_dir name>.safetensors in the original SDXL "
           "layout (A1111/Forge, ComfyUI's Load Checkpoint, kohya's scripts, diffusers' from_single_file).")
    a("--config", default=None, help="YAML or JSON file of flag values (its keys are flag names); the command "
                                     "line wins. Every run writes its resolved config to train_config.json.")
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = p.parse_known_args(argv)
    values = {}
    if known.config:
        values = read_config(known.config, p)
        if any(a.startswith("--validation_prompt") for a in argv):
            values.pop("validation_prompt", None)  # the command line's prompts replace the file's, not add to them
        p.set_defaults(**values)
    args, unknown = p.parse_known_args(argv)
    # Which flags the file set (the command line did not override), so an error about one can say where it is.
    args.config_flags = sorted(o for a in p._actions for o in a.option_strings
                               if a.dest in values and getattr(args, a.dest) == values[a.dest])
    if unknown:  # one line for all of them, with the replacement where a diffusers or kohya flag has one
        flags = [u for u in unknown if u.startswith("-")] or unknown[:1]
        raise UserError("unrecognized argument" + "s" * (len(flags) > 1) + ": " + "; ".join(
            f"{f!r} ({FOREIGN_FLAGS.get(f.split('=')[0], 'see --help for the flags')})" for f in flags))
    if args.loss_weighting is None:  # a diffusers command line turns min-SNR on with --snr_gamma alone
        args.loss_weighting = "min_snr" if args.snr_gamma is not None else "debias"
    elif args.loss_weighting != "min_snr" and any(a.split("=")[0] == "--snr_gamma" for a in argv):
        message = f"--snr_gamma is min-SNR's γ, unused by --loss_weighting {args.loss_weighting}: drop one"
        raise UserError(message + config_origin(message, args))  # (main has no args yet to say it)
    if args.snr_gamma is None:
        args.snr_gamma = 5.0
    # LoRA-only flags: remember which were given (an error with --finetune full), then fill their defaults.
    args.lora_flags_given = [n for n, _ in LORA_DEFAULTS if getattr(args, n) is not None]
    if args.finetune == "lora":
        for name, default in LORA_DEFAULTS:
            if getattr(args, name) is None:
                setattr(args, name, args.rank if name == "lora_alpha" else default)
    return args


# Flags of diffusers' and kohya's scripts that this one does differently.
SDPA_USED = "not needed: PyTorch's scaled-dot-product attention is used"
RANK_FROM_LAUNCHER = "launch with accelerate launch or torchrun, which pass the rank in the environment"
KOHYA_DATASET_CONFIG = ("kohya's dataset config is not read: pass the images' folder with --train_data_dir (a "
                        "subset's num_repeats is its folder's N_ prefix, as in kohya's DreamBooth folders) and set "
                        "resolution, batch size and caption options with this trainer's flags")
TEXT_CACHED = ("the default: caption embeddings are cached unless --train_text_encoder, --shuffle_caption or "
               "--no_text_cache; drop it")
FULL_HALF = "not supported: trained weights stay fp32 under --mixed_precision (for memory: --optimizer adamw8bit)"
BUCKETS = "--aspect_ratio_bucketing uses SDXL's ~1 MP bucket shapes scaled to --resolution; not adjustable"
FOREIGN_FLAGS = {
    "--use_8bit_adam": "use --optimizer adamw8bit",
    "--enable_xformers_memory_efficient_attention": SDPA_USED,
    "--validation_epochs": "use --validation_steps (in optimizer steps)",
    "--debug_loss": "the loss per timestep bucket is always in metrics.jsonl",
    "--image_interpolation_mode": "images are resized with Lanczos",
    **{f"--timestep_bias_{k}": "use --min_timestep / --max_timestep to train on a range of timesteps"
       for k in ("strategy", "multiplier", "begin", "end", "portion")},
    "--enable_npu_flash_attention": SDPA_USED, "--dream_detail_preservation": "not supported",
    "--instance_data_dir": "DreamBooth-style: put the images with same-name .txt captions (your instance prompt) "
                           "in a folder and pass --train_data_dir",
    "--instance_prompt": "write the prompt into a same-name .txt caption next to each image (--train_data_dir)",
    "--network_dim": "use --rank", "--network_alpha": "use --lora_alpha",
    "--local_rank": RANK_FROM_LAUNCHER, "--local-rank": RANK_FROM_LAUNCHER,
    "--dream_training": "not supported", "--tracker_project_name": "runs are named train_sdxl_debias",
    "--non_ema_revision": "not needed: the EMA starts from the loaded weights",
    "--offload_ema": "not supported", "--foreach_ema": "not needed",
    # kohya's sd-scripts
    "--debiased_estimation_loss": "this trainer's default: --loss_weighting debias",
    "--min_snr_gamma": "use --snr_gamma (with --loss_weighting min_snr)",
    "--xformers": SDPA_USED, "--mem_eff_attn": SDPA_USED,
    "--sdpa": "always on (--sdpa_backend picks the kernel): drop it", "--optimizer_type": "use --optimizer",
    "--save_every_n_steps": "use --checkpointing_steps", "--cache_latents_to_disk": "use --cache_latents",
    "--output_name": "use --output_dir",
    "--max_train_epochs": "use --num_train_epochs", "--enable_bucket": "use --aspect_ratio_bucketing",
    "--v_parameterization": "use --prediction_type v_prediction", "--log_with": "use --report_to",
    "--max_data_loader_n_workers": "use --dataloader_num_workers", "--vae": "use --pretrained_vae_model_name_or_path",
    "--sample_prompts": "use --validation_prompt (repeatable)", "--network_dropout": "use --lora_dropout",
    "--unet_lr": "use --learning_rate",
    "--network_module": "LoRA is --finetune lora (the default): drop it",
    "--network_train_unet_only": "the default (--train_text_encoder adds the text encoders): drop it",
    "--network_args": "use --rank, --lora_alpha, --lora_target_modules, --use_dora",
    "--dataset_config": KOHYA_DATASET_CONFIG, "--datasets": KOHYA_DATASET_CONFIG,
    "--cache_text_encoder_outputs": TEXT_CACHED, "--cache_text_encoder_outputs_to_disk": TEXT_CACHED,
    "--persistent_data_loader_workers": "the default (the loader's workers live through the run): drop it",
    "--save_model_as": "outputs are always .safetensors: drop it",
    "--save_precision": "a LoRA is saved in fp32, a full fine-tune's pipeline in fp32 and its --save_single_file "
                        "in --mixed_precision's dtype: drop it",
    "--save_state": "every checkpoint holds the training state (--checkpointing_steps): drop it",
    "--save_every_n_epochs": "use --checkpointing_steps (in optimizer steps)",
    "--max_token_length": "captions are cut at CLIP's 77 tokens, as in diffusers: drop it",
    "--no_half_vae": "the VAE runs in fp32 unless its config allows half precision (force_upcast false): drop it",
    "--clip_skip": "not supported: SDXL already conditions on each text encoder's penultimate layer",
    "--full_bf16": FULL_HALF, "--full_fp16": FULL_HALF,
    "--min_bucket_reso": BUCKETS, "--max_bucket_reso": BUCKETS, "--bucket_reso_steps": BUCKETS,
    "--bucket_no_upscale": BUCKETS,
    "--multires_noise_iterations": "not supported: use --noise_offset",
    "--multires_noise_discount": "not supported: use --noise_offset",
    "--loss_type": "the loss is the MSE, weighted by --loss_weighting",
    "--prior_loss_weight": "regularization images are not supported",
    "--pretrained_model_name": "use --pretrained_model_name_or_path",
    "--flip_aug": "use --random_flip", "--caption_dropout_rate": "use --caption_dropout",
    "--ip_noise_gamma": "use --input_perturbation", "--resume": "use --resume_from_checkpoint (a folder, or latest)",
    "--config_file": "use --config (YAML, JSON or TOML, keys named as this trainer's flags)",
    "--in_json": "captions come from .txt files beside the images, or a metadata.jsonl (--train_data_dir)",
    "--reg_data_dir": "regularization images are not supported: train on your images alone",
}
LORA_DEFAULTS = (("rank", 4), ("lora_alpha", None), ("lora_dropout", 0.0), ("lora_target_modules",
                 "to_q,to_k,to_v,to_out.0"), ("use_dora", False), ("init_lora_weights", "gaussian"),
                 ("network_weights", None))
COMMA_LISTS = ("lora_target_modules",)  # flags whose one value is a comma-separated list
NOT_CONFIG = ("config", "lora_flags_given", "config_flags", "hub_token",  # never read from or written to a config file
              "data_fingerprint", "made_output_dir")
NOT_SAVED = NOT_CONFIG + ("resume_from_checkpoint", "overwrite_output_dir")  # rerunning a config reproduces the run


def read_config(path, parser):
    """Flag values from a YAML or JSON file; keys are flag names (with or without dashes, aliases allowed)."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:  # UTF-8 on every OS (Windows' default would be cp1252), or UTF-16 with its mark (PowerShell's `>`)
        text = data.decode("utf-16") if data.startswith(UTF16_BOMS) else data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"--config {path!r} is not UTF-8: save it as UTF-8") from None
    kind = os.path.splitext(path)[1].lower()
    try:
        if kind in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        elif kind == ".toml":  # kohya's config files: its [sections] are read as one flat table
            import tomllib
            values = {}
            for key, value in tomllib.loads(text).items():
                values.update(value if isinstance(value, dict) else {key: value})
        else:
            values = json.loads(text)
    except ImportError:
        raise UserError(f"--config {path!r}: TOML needs Python 3.11 or newer; write it as YAML or JSON") from None
    except Exception as e:
        raise UserError(f"--config {path!r} is not valid {'TOML' if kind == '.toml' else 'YAML/JSON'}: "
                        f"{first_line(e)}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path!r} must hold a mapping of flag names to values")
    actions = {o.lstrip("-"): a for a in parser._actions for o in a.option_strings}
    unknown = [k for k in values if str(k).lstrip("-") not in actions]
    if unknown:  # kohya's or diffusers' names with ours beside them
        raise UserError(f"--config {path!r} has unknown keys: " + ", ".join(
            f"{k} ({FOREIGN_FLAGS['--' + str(k).lstrip('-')]})" if '--' + str(k).lstrip('-') in FOREIGN_FLAGS
            else str(k) for k in unknown))
    if any(actions[str(k).lstrip("-")].dest == "hub_token" for k in values):
        raise UserError(f"--config {path!r} holds hub_token, which is never read from a file that may be shared or "
                        "published: remove it, and log in with `hf auth login` (or set HF_TOKEN)")
    out = {}
    for key, value in values.items():
        action = actions[str(key).lstrip("-")]
        if action.dest not in NOT_CONFIG:
            out[action.dest] = config_value(action, value, path)
    return out


def config_value(action, value, path):
    """A config file's value, checked as argparse checks the command line (defaults bypass its checks)."""
    name = f"--config {path!r}: {action.option_strings[0]}"
    if value is None or value == "":  # `learning_rate:` left empty in YAML, null in JSON (our train_config.json),
        return action.default  # "" in TOML, which has no null (the kohya_ss GUI writes "" for a field left blank)
    if action.nargs == 0:  # store_true / store_const flags: a YAML/JSON boolean
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, not {value!r}")
        return value if value else action.default
    if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
        value = [value]  # one validation prompt given as a string
    elif action.dest in COMMA_LISTS and isinstance(value, list):
        value = ",".join(map(str, value))  # lora_target_modules: [to_q, to_k] in YAML
    elif isinstance(value, (list, dict)) and not isinstance(action, argparse._AppendAction):
        raise UserError(f"{name} takes one value, not {value!r}")
    items = value if isinstance(value, list) else [value]
    if action.choices and "no" in action.choices:
        items = ["no" if v is False else v for v in items]  # YAML reads an unquoted `no` as false
    if any(isinstance(v, bool) or (action.type is int and isinstance(v, float) and not v.is_integer())
           for v in items):
        raise UserError(f"{name} has a value of the wrong type: {value!r}")
    try:
        items = [action.type(v) if action.type else v for v in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{name} has a value of the wrong type: {value!r}") from None
    if action.choices and any(v not in action.choices for v in items):
        raise UserError(f"{name} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return items if isinstance(value, list) else items[0]


PATH_FLAGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "single_file_config", "dataset",
              "train_data_dir", "output_dir", "cache_dir", "data_cache_dir", "resume_from_checkpoint",
              "network_weights")


def validate(args):
    """Fail fast, before any model loads, with one line that names the problem and what to do."""
    check_places(args)
    check_combinations(args)
    check_values(args)
    check_models(args)
    check_resume(args)


def check_places(args):
    """The folders and launcher: what the run reads and writes, and that they are not each other."""
    for name in PATH_FLAGS:  # the shell expands ~ on the command line, but not in a --config file
        if isinstance(getattr(args, name), str) and getattr(args, name).startswith("~"):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    for name in ("output_dir", "cache_dir", "data_cache_dir"):
        if getattr(args, name):  # a shared Hub download cache may be read-only: only what we write must be writable
            check_folder(name, getattr(args, name), write=name != "cache_dir")
    if args.cache_dir and args.data_cache_dir != args.cache_dir and os.path.isdir(args.cache_dir) and any(
            re.match(r"(text|latents)-.*\.safetensors$", n) for n in os.listdir(args.cache_dir)):
        raise UserError(f"--cache_dir {args.cache_dir!r} holds this trainer's latent/text cache, which is now "
                        "--data_cache_dir (--cache_dir is the Hub download cache, as in diffusers): pass "
                        f"--data_cache_dir {args.cache_dir!r} to reuse it")
    launched = any(os.environ.get(v) for v in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                               "MV2_COMM_WORLD_SIZE"))
    if os.environ.get("LOCAL_RANK", "-1") != "-1" and not launched:  # accelerate would wait for peers not started
        raise UserError("LOCAL_RANK is set in the environment but WORLD_SIZE is not: launch with accelerate launch "
                        "or torchrun, or unset LOCAL_RANK to run one process")
    if not args.dataset and not args.train_data_dir:
        raise UserError("no training data: pass --dataset <hub id or folder> or --train_data_dir <folder>")
    if args.dataset and args.train_data_dir:
        raise UserError("pass either --dataset or --train_data_dir, not both")
    if args.train_data_dir and not os.path.isdir(args.train_data_dir):
        raise UserError(f"--train_data_dir {args.train_data_dir!r} is not a folder" + (
            ": pass a data file as --dataset" if os.path.isfile(args.train_data_dir) else ""))
    data = args.train_data_dir or args.dataset
    if os.path.isdir(data) and os.path.realpath(data) == os.path.realpath(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir!r} is the dataset folder: pass another, beside it (the "
                        "outputs would be read as data on the next run)")
    base = args.pretrained_model_name_or_path
    if os.path.isdir(base) and os.path.realpath(base) == os.path.realpath(args.output_dir) and \
            not os.path.isfile(os.path.join(base, "train_config.json")):  # (an output of ours continued in place)
        raise UserError(f"--output_dir {args.output_dir!r} is the base model's folder: pass another (this run's "
                        "outputs, a full fine-tune's weights or the model card, would replace the base model's files)")


def check_combinations(args):
    """Flags that need, or exclude, one another, this torch, or an optional package."""
    if args.keep_tokens < 0 or (args.keep_tokens and not args.shuffle_caption):
        raise UserError(f"--keep_tokens {args.keep_tokens}: the number of leading tags --shuffle_caption leaves in "
                        "place (0 or more): use it with --shuffle_caption")
    if args.finetune == "full" and args.lora_flags_given:
        raise UserError(f"--{args.lora_flags_given[0]} only applies to --finetune lora; drop it for a full fine-tune")
    if args.finetune == "full" and args.train_text_encoder:
        raise UserError("--train_text_encoder trains LoRA adapters: use it with --finetune lora")
    if args.finetune == "lora" and args.save_single_file:
        raise UserError("--save_single_file is for --finetune full; a LoRA is already one file (<output_dir>.safetensors)")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise UserError("--text_encoder_lr needs --train_text_encoder")
    if args.finetune == "lora" and args.use_ema:
        raise UserError("--use_ema applies to --finetune full (a LoRA is small; average checkpoints instead)")
    if args.sdpa_backend != "auto" and "set_priority" not in inspect.signature(
            torch.nn.attention.sdpa_kernel).parameters:
        raise UserError(f"--sdpa_backend {args.sdpa_backend} needs torch 2.6 or newer (this is {torch.__version__}): "
                        "upgrade torch, or leave it at auto")
    if args.compile_mode != "default" and not args.compile:
        raise UserError("--compile_mode needs --compile")
    if args.compile_scope != "blocks" and not args.compile:
        raise UserError("--compile_scope needs --compile")
    if uses_cuda_graphs(args) and args.validation_prompt and not hasattr(torch.compiler, "set_stance"):
        raise UserError(f"--compile_mode {args.compile_mode} with --validation_prompt needs torch 2.6 or newer "
                        f"(this is {torch.__version__}): upgrade torch, or use --compile_mode default")
    if args.hub_token and (args.report_to not in (None, "none") or resolve_trackers(args)):
        raise UserError("--hub_token would be logged by --report_to's tracker: run `hf auth login` instead")
    import importlib.util
    package = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(args.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--optimizer {args.optimizer} needs the {package} package: pip install {package}")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set")


def check_values(args):
    """Numbers out of range: each ends here in one line, not in a crash after the models load."""
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if args.resolution < 64:  # an 8x8 latent, which the UNet halves twice; a GroupNorm crash below that
        raise UserError(f"--resolution {args.resolution} is below 64 px, too small for the UNet (SDXL trains at "
                        "512 to 1024)")
    if args.max_timestep is not None and not 0 <= args.min_timestep < args.max_timestep:
        raise UserError("--min_timestep must be >= 0 and below --max_timestep")
    if not 0 < args.ema_decay < 1:
        raise UserError("--ema_decay must be between 0 and 1")
    for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "logging_steps", "num_validation_images", "cache_batch_size",
                 "validation_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        raise UserError("--dataloader_num_workers must be 0 or more")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0 <= args.caption_dropout <= 1:
        raise UserError("--caption_dropout must be between 0 and 1")
    # Values the optimizer would take without a word and train wrongly with (a negative rate climbs the loss, a
    # zero alpha or a negative clipping norm zeroes or flips every update), or refuse only after the models load.
    for name, ok, want in (("learning_rate", lambda v: v >= 0, "0 or more"),
                           ("text_encoder_lr", lambda v: v >= 0, "0 or more"),
                           ("adam_beta1", lambda v: 0 <= v < 1, "at least 0 and below 1"),
                           ("adam_beta2", lambda v: 0 <= v < 1, "at least 0 and below 1"),
                           ("adam_epsilon", lambda v: v >= 0, "0 or more"),
                           ("adam_weight_decay", lambda v: v >= 0, "0 or more"),
                           ("max_grad_norm", lambda v: v >= 0, "0 or more (0: no clipping)"),
                           ("lr_warmup_steps", lambda v: v >= 0, "0 or more"),
                           ("lr_num_cycles", lambda v: v >= 1, "at least 1"),
                           ("lr_power", lambda v: v > 0, "above 0"),
                           ("rank", lambda v: v >= 1, "at least 1"),  # (before the alpha it defaults)
                           ("lora_alpha", lambda v: v > 0, "above 0"),
                           ("lora_dropout", lambda v: 0 <= v < 1, "at least 0 and below 1"),
                           ("seed", lambda v: 0 <= v < 2**32, f"between 0 and {2**32 - 1}")):
        if getattr(args, name) is not None and not ok(getattr(args, name)):
            raise UserError(f"--{name} {getattr(args, name)} must be {want}")
    if args.finetune == "lora":  # "to_q, to_k": without the strip, " to_k" would silently match nothing
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        if not targets:
            raise UserError("--lora_target_modules is empty; e.g. to_q,to_k,to_v,to_out.0")
        args.lora_target_modules = ",".join(targets)
    if args.snr_gamma <= 0:
        raise UserError("--snr_gamma must be positive")


def check_models(args):
    """The base model, VAE and starting LoRA: each path exists and holds what its flag takes."""
    model = args.pretrained_model_name_or_path
    for flag in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"):
        path = getattr(args, flag) or ""
        if path.startswith(("http://", "https://")):
            raise UserError(f"--{flag} {path!r} is a URL: download the file and pass its path (or pass a Hub id)")
        # (A missing path that is no Hub id either: diffusers would say "Repo id must be in the form...".)
        if (looks_local(path) or os.path.splitext(path)[1].lower() in SINGLE_FILE_EXTS) and not os.path.exists(path):
            raise UserError(f"--{flag} {path!r} does not exist")
    if os.path.isfile(model):
        check_single_file(args)
        if args.single_file_config:
            check_pipeline_folder(args.single_file_config)
    elif args.single_file_config:
        raise UserError("--single_file_config is for a --pretrained_model_name_or_path that is one checkpoint file; "
                        f"{model!r} is not: leave it out")
    elif os.path.isdir(model):
        check_base_folder(model)
    vae = args.pretrained_vae_model_name_or_path
    if vae and os.path.isfile(vae):
        check_vae_file(vae)
    elif vae and os.path.isdir(vae):
        check_vae_folder(vae)
    if args.network_weights:
        check_lora_file(args)


def check_resume(args):
    """--resume_from_checkpoint names a checkpoint of this trainer, and a fresh run does not bury another's."""
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        bare = os.path.basename(os.path.normpath(resume)) == resume.rstrip("/" + os.sep)  # checkpoint-3, not ./…
        resume = args.resume_from_checkpoint = os.path.normpath(resume)  # (checkpoint-3/: basename 'checkpoint-3')
        # A bare name is output_dir's checkpoint, as in diffusers, even where the working folder has one too.
        if bare and os.path.isdir(os.path.join(args.output_dir, resume)):
            resume = args.resume_from_checkpoint = os.path.join(args.output_dir, resume)
    if resume and resume != "latest" and os.path.isfile(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} is a file: pass its checkpoint folder "
                        f"({os.path.dirname(resume) or '.'!r}) or 'latest'")
    if resume and resume != "latest" and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} does not exist; pass a checkpoint folder or 'latest'")
    if resume and resume != "latest" and os.path.exists(os.path.join(resume, STATE_FILE)):
        step = read_state(resume)["global_step"]
        newer = [os.path.basename(p) for s, p in list_checkpoints(args.output_dir) if s > step]
        if newer:  # they would outrank the new run's checkpoints for `latest` and be kept by pruning instead
            raise UserError(f"{args.output_dir} already holds checkpoints past {os.path.basename(resume)}'s step "
                            f"{step} ({', '.join(newer)}): --resume_from_checkpoint latest continues from them; to "
                            f"restart from step {step}, move or delete them first")
    if not resume and not args.overwrite_output_dir and list_checkpoints(args.output_dir):
        raise UserError(f"{args.output_dir} holds checkpoints of another run: pass --resume_from_checkpoint latest "
                        "to continue it, --overwrite_output_dir to start afresh, or another --output_dir")
    foreign = [n for n in (os.listdir(args.output_dir) if resume == "latest" and os.path.isdir(args.output_dir) else [])
               if CHECKPOINT_RE.match(n) and not os.path.exists(os.path.join(args.output_dir, n, STATE_FILE))]
    if foreign and not list_checkpoints(args.output_dir):
        # `latest` would find none of ours and start from step 0, over the results the user meant to continue
        raise UserError(f"--resume_from_checkpoint latest: {args.output_dir} holds {', '.join(sorted(foreign))}, "
                        f"not written by this trainer (no {STATE_FILE}; diffusers' scripts write such), which it "
                        "cannot resume: start a new run in another --output_dir")


def check_folder(flag, path, write=True):
    """A folder, or one the run can create (and, with `write`, write in); else one line naming what is in the
    way."""
    here = os.path.abspath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:  # (an unreachable drive: its root)
        here = os.path.dirname(here)
    if not os.path.exists(here):
        raise UserError(f"--{flag} {path!r}: {here!r} does not exist; pass a folder on a disk that does")
    if not os.path.isdir(here):
        where = "is a file" if here == os.path.abspath(path) else f"is inside {here!r}, a file"
        raise UserError(f"--{flag} {path!r} {where}; pass a folder")
    if write and not os.access(here, os.W_OK | os.X_OK):
        raise UserError(f"--{flag} {path!r}: cannot write in {here!r} (its permissions, or a read-only disk); "
                        "pick another folder")


# ----------------------------------------------------------------------------------------------------------------
# 2. models
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Models:
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype
    loss_scale: float = 1.0  # 1 / mean weight with --normalize_loss_weights (see loss.mean_weight)
    ema: object = None       # diffusers EMAModel of the UNet with --use_ema
    sampler: object = None   # a checkpoint file's inference scheduler (a folder's is read again by from_pretrained)


def load_part(cls, args, subfolder, path=None, own_repo=False, **kw):
    """from_pretrained with the base model's revision/variant (not for a separate repo such as a VAE's),
    turning 'not found / offline' into a UserError."""
    path = path or args.pretrained_model_name_or_path
    kw["cache_dir"] = args.cache_dir
    if not own_repo:
        kw["revision"] = args.revision
        if not subfolder.startswith("tokenizer"):
            kw["variant"] = args.variant
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kw)
    except (OSError, ValueError) as e:
        where = f"{path}/{subfolder}" if subfolder else path
        raise UserError(f"cannot load {cls.__name__} from {where!r}: check the model id or folder "
                        f"(and that the Hub is reachable, or the model is cached): {first_line(e)}") from None


def first_line(e):
    """An exception's first line, for a one-line message; a very long one is cut at a word, marked with …."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(line) <= 300:
        return line
    cut = line[:300].rsplit(" ", 1)[0]
    return (cut if len(cut) > 240 else line[:300]) + " …"  # at a word near the end, else where it falls


def load_models(args, accelerator):
    """Tokenizers, both text encoders, VAE, UNet and the DDPM noise scheduler; frozen parts in weight_dtype."""
    import transformers
    transformers.logging.set_verbosity_error()  # silence "torchvision not installed" notices on import
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    vae = load_vae(args) if args.pretrained_vae_model_name_or_path else None
    sampler = None
    if os.path.isfile(args.pretrained_model_name_or_path):  # one checkpoint file: every part from it, at once
        pipe = base_pipeline(args, **({"vae": vae} if vae else {}))
        tokenizers, text_encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
        vae, unet, sampler = pipe.vae, pipe.unet, pipe.scheduler
        noise_scheduler = DDPMScheduler.from_config(sampler.config)  # (with the file's v_pred/ztsnr, if marked)
    else:
        tokenizers = [load_part(AutoTokenizer, args, s, use_fast=True) for s in ("tokenizer", "tokenizer_2")]
        text_encoders = [load_part(CLIPTextModel, args, "text_encoder"),
                         load_part(CLIPTextModelWithProjection, args, "text_encoder_2")]
        vae = vae or load_part(AutoencoderKL, args, "vae")
        unet = load_part(UNet2DConditionModel, args, "unet")
        noise_scheduler = load_part(DDPMScheduler, args, "scheduler")
    for tok, sub in zip(tokenizers, ("tokenizer", "tokenizer_2")):
        if len(tok) < 1000 and tok.model_max_length > 1000:  # transformers' silent failure without vocab files
            where = args.single_file_config or args.pretrained_model_name_or_path
            raise UserError(f"{where}/{sub} has no usable tokenizer files")
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.get("rescale_betas_zero_snr") and noise_scheduler.config.prediction_type == "epsilon":
        logger.warning("the model's schedule has zero terminal SNR, where an ε-prediction says nothing about the "
                       "image at the last timestep (its input is the noise itself): such models predict v; if this "
                       "one does, pass --prediction_type v_prediction")
    num_t = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.min_timestep < (args.max_timestep or num_t) <= num_t:
        raise UserError(f"the timestep range [{args.min_timestep}, {args.max_timestep or num_t}) must lie in the "
                        f"scheduler's [0, {num_t}): fix --min_timestep / --max_timestep")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    m = prepare_models(args, tokenizers, text_encoders, vae, unet, noise_scheduler, accelerator.device, weight_dtype)
    m.sampler = sampler
    return m


SINGLE_FILE_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")


def check_single_file(args):
    """A checkpoint file as the base model must be an SDXL one (UNet, VAE and both text encoders in the original
    layout, as A1111/ComfyUI/kohya read them). A LoRA, an SD 1.x/2.x file, one diffusers model's weights or a
    download cut short is named here, before anything loads (a .ckpt, a pickle, is left to diffusers)."""
    path = args.pretrained_model_name_or_path
    flag = f"--pretrained_model_name_or_path {path!r}"
    for name in ("variant", "revision"):
        if getattr(args, name):
            raise UserError(f"--{name} picks files of a diffusers folder or Hub id, and {path!r} is one file: leave "
                            f"--{name} out")
    keys = checkpoint_file_keys(flag, path)
    if keys is None:
        return
    if holds_lora(keys):
        raise UserError(f"{flag} is a LoRA, not a base model: pass the SDXL checkpoint it applies to")
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise UserError(f"{flag} is a Stable Diffusion 1.x/2.x checkpoint; this trainer trains SDXL: pass an SDXL one")
    if not any(k.startswith("model.diffusion_model.") for k in keys) or not any(
            k.startswith("conditioner.embedders.1.") for k in keys):
        what = ("one diffusers model's weights: pass the pipeline folder that holds it" if "conv_in.weight" in keys
                else "not a whole SDXL base checkpoint (model.diffusion_model.* and conditioner.embedders.*; a "
                     "refiner or a UNet alone is not): pass one")
        raise UserError(f"{flag} is {what}")


WINDOWS_ABSOLUTE = re.compile(r"[A-Za-z]:[\\/]|\\\\")  # C:\x, C:/x, \\server\share


def looks_local(path):
    """A path, not a Hub id (organisation/name): ./x, ../x, /x, ~/x, C:\\x, \\\\server\\x, or a/b/c."""
    return path.startswith((".", "/", "~", "\\")) or path.count("/") > 1 or bool(WINDOWS_ABSOLUTE.match(path))


def check_pipeline_folder(config):
    """--single_file_config, when local: a diffusers SDXL pipeline folder (its configs and tokenizers are read)."""
    if not (os.path.exists(config) or looks_local(config)):
        return  # a Hub id
    if os.path.isfile(config):
        raise UserError(f"--single_file_config {config!r} is a file (an original .yaml config is not read): pass a "
                        "diffusers SDXL pipeline folder or Hub id")
    if not os.path.isfile(os.path.join(config, "model_index.json")):
        what = "is not a diffusers pipeline folder (no model_index.json)" if os.path.isdir(config) else "does not exist"
        raise UserError(f"--single_file_config {config!r} {what}")
    check_pipeline_class(config, "--single_file_config")


def check_pipeline_class(folder, flag):
    """A pipeline folder's model_index.json names an SDXL pipeline."""
    with open(os.path.join(folder, "model_index.json")) as f:
        kind = json.load(f).get("_class_name", "")
    if not kind.startswith("StableDiffusionXL"):
        raise UserError(f"{flag} {folder!r} is a {kind or 'pipeline'} folder; pass an SDXL one "
                        "(StableDiffusionXLPipeline), e.g. stabilityai/stable-diffusion-xl-base-1.0")


def check_base_folder(folder):
    """A local base model: a diffusers SDXL pipeline folder. Its parts load from their subfolders, so one without
    model_index.json (parts downloaded alone) trains; one without unet/ is data, a checkpoint file's folder, or
    a typo, which diffusers would report as a tokenizer it cannot instantiate."""
    flag = "--pretrained_model_name_or_path"
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        check_pipeline_class(folder, flag)
    elif not os.path.isfile(os.path.join(folder, "unet", "config.json")):
        parent = os.path.dirname(os.path.normpath(os.path.abspath(folder)))
        if os.path.isfile(os.path.join(folder, "config.json")) and (
                os.path.isfile(os.path.join(parent, "model_index.json")) or
                os.path.isfile(os.path.join(parent, "unet", "config.json"))):  # its weights file is refused too
            raise UserError(f"{flag} {folder!r} is one part of a diffusers pipeline: pass the pipeline folder "
                            f"{parent!r}")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(SINGLE_FILE_EXTS))
        raise UserError(f"{flag} {folder!r} is not a diffusers pipeline folder (no model_index.json, no unet/)" +
                        (f": to train from the checkpoint file in it, pass {flag} {os.path.join(folder, files[0])!r}"
                         if files else ""))


def check_vae_file(path):
    """A VAE file must hold an autoencoder in the original layout (as sdxl_vae.safetensors; a whole checkpoint's
    first_stage_model is read too). diffusers' layout, a weights file out of its folder, has no config to go with it."""
    flag = f"--pretrained_vae_model_name_or_path {path!r}"
    keys = checkpoint_file_keys(flag, path)
    if keys is None:
        return
    if holds_lora(keys):
        raise UserError(f"{flag} is a LoRA, not a VAE")
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise UserError(f"{flag} is a Stable Diffusion 1.x/2.x checkpoint, whose VAE is not SDXL's: pass an SDXL VAE")
    if not any(k.endswith("encoder.conv_in.weight") for k in keys):
        raise UserError(f"{flag} holds no VAE (no encoder.conv_in.weight): pass an SDXL VAE file, folder or Hub id")
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        raise UserError(f"{flag} is a diffusers VAE's weights file: pass the folder that holds it (with its "
                        "config.json)")


def check_vae_folder(folder):
    """A local VAE folder is a diffusers AutoencoderKL's (config.json beside its weights); a pipeline folder given
    instead is named, with its vae/ to pass."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    inner = os.path.join(folder, "vae")
    raise UserError(f"--pretrained_vae_model_name_or_path {folder!r} has no config.json: " + (
        f"it is a pipeline folder, pass its VAE {inner!r}" if os.path.isfile(os.path.join(inner, "config.json"))
        else "pass a diffusers AutoencoderKL folder or a VAE .safetensors file"))


def holds_lora(keys):
    """Whether a file's tensor names are a LoRA's (kohya's lora_unet_…/lora_down, peft's lora_A, diffusers'
    lora.down): one test for the three checks that ask, a LoRA where a model is wanted or the reverse."""
    return any("lora" in k.lower() for k in keys)


def checkpoint_file_keys(flag, path):
    """The tensor names of a model file given as `flag` (its header only); None for a pickle (.ckpt), which is
    left to diffusers. A file of another kind, or one that cannot be read, is a UserError."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".sft":
        raise UserError(f"{flag}: diffusers reads safetensors only under the .safetensors extension: rename the file")
    if ext not in SINGLE_FILE_EXTS:
        raise UserError(f"{flag} is a file but no model checkpoint: pass a .safetensors (or .ckpt) file, or a "
                        "diffusers folder or Hub id")
    if ext != ".safetensors":
        return None
    keys = checkpoint_keys(path)
    if keys is None:
        why = "a Git LFS pointer (run `git lfs pull`)" if lfs_pointer(path) else "a download cut short?"
        raise UserError(f"{flag} is not a readable safetensors file ({why}): download it again")
    return keys


@functools.lru_cache(maxsize=4)
def checkpoint_keys(path):
    """The tensor names of a .safetensors file (its header only); None when it is no readable safetensors file."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return tuple(f.keys())
    except Exception:  # (safetensors' own error type, or an OSError)
        return None


def single_file_scheduler(path):
    """The scheduler settings a checkpoint file marks by empty tensors, as ComfyUI reads them (and
    sdxl_checkpoint writes them): `v_pred`, a v-prediction model; `ztsnr`, zero terminal SNR (sampled with
    trailing timesteps, as diffusers advises for it)."""
    keys = set(checkpoint_keys(path) or ()) if path.lower().endswith(".safetensors") else set()
    return {**({"prediction_type": "v_prediction"} if "v_pred" in keys else {}),
            **({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if "ztsnr" in keys else {})}


def load_vae(args, **kw):
    """--pretrained_vae_model_name_or_path: a diffusers VAE (Hub id or folder), or one file in the original
    layout, read with the base model's VAE config: the file alone does not say it is SDXL's (scaling factor
    0.13025, not SD 1.x's 0.18215), which is what diffusers would guess from it."""
    from diffusers import AutoencoderKL

    path, base = args.pretrained_vae_model_name_or_path, args.pretrained_model_name_or_path
    if not os.path.isfile(path):
        return load_part(AutoencoderKL, args, "", path=path, own_repo=True, **kw)
    config = vae_file_config(args)
    try:
        with quiet_diffusers():
            return AutoencoderKL.from_single_file(path, config=config, subfolder="vae", cache_dir=args.cache_dir, **kw)
    except Exception as e:  # (diffusers' SingleFileComponentError is a bare Exception)
        hint = ""
        if "appear to be missing" in str(e):
            hint = ": it holds no VAE"
        elif os.path.isfile(base) and not args.single_file_config:  # the config came from the Hub, or did not
            hint = ": pass --single_file_config with a diffusers SDXL folder (offline: a folder, or a cached Hub id)"
        raise UserError(f"cannot load the VAE file {path!r} with the VAE config of {config!r} ({first_line(e)})"
                        f"{hint}") from None


def vae_file_config(args):
    """The diffusers config a VAE file is read with: the base model's, or SDXL's when the base is a file too."""
    base = args.pretrained_model_name_or_path
    return (args.single_file_config or SDXL_BASE) if os.path.isfile(base) else base


def single_file_hint(e, config):
    """What to do about a checkpoint file from_single_file could not load: the file (a pickle of more than
    tensors, or without a whole model's parts), or the configs."""
    words = str(e)
    if "weights_only" in words or "checkpoint file" in words or "pickle" in words.lower():
        return "the file itself could not be read (an old .ckpt pickles more than tensors): convert it to .safetensors"
    if "appear to be missing" in words:  # SingleFileComponentError: "Weights for this component appear to be missing"
        return "it is not a whole SDXL checkpoint (UNet, VAE and both text encoders)"
    if config:
        return (f"check that --single_file_config {config!r} is a diffusers SDXL pipeline (offline: a folder, or a Hub "
                "id in the cache)")
    return ("pass --single_file_config with a diffusers SDXL folder or Hub id of the same architecture (offline: a "
            "folder, or a Hub id in the cache)")


@contextmanager
def quiet_diffusers():
    """diffusers' logging at errors only, for its notices about what we handle ourselves."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def base_pipeline(args, **parts):
    """The base model as a StableDiffusionXLPipeline with `parts` (unet=..., torch_dtype=...) in place of its
    own: from a Hub id or folder, or from one checkpoint file with diffusers' from_single_file (the configs and
    tokenizers from --single_file_config, or those diffusers infers from the file's keys)."""
    from diffusers import StableDiffusionXLPipeline

    base = args.pretrained_model_name_or_path
    with warnings.catch_warnings():  # newer diffusers renames torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        if not os.path.isfile(base):
            return StableDiffusionXLPipeline.from_pretrained(base, revision=args.revision, variant=args.variant,
                                                             cache_dir=args.cache_dir, **parts)
        try:
            with quiet_diffusers():  # (its "attempting to download the config files" notice before our error)
                pipe = StableDiffusionXLPipeline.from_single_file(base, config=args.single_file_config,
                                                                  cache_dir=args.cache_dir, **parts)
        except Exception as e:  # (diffusers' SingleFileComponentError is a bare Exception)
            raise UserError(f"cannot load {base!r} with diffusers' from_single_file ({first_line(e)}): "
                            f"{single_file_hint(e, args.single_file_config)}") from None
    missing = [name for name in ("tokenizer_2", "text_encoder_2") if getattr(pipe, name, None) is None]
    if missing:
        where = args.single_file_config or "the config diffusers chose"
        raise UserError(f"{where} has no {' or '.join(missing)}: pass --single_file_config with a diffusers SDXL "
                        "pipeline (model_index.json naming StableDiffusionXLPipeline)")
    marked = single_file_scheduler(base)
    if marked:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **marked)
    return pipe


def prepare_models(args, tokenizers, text_encoders, vae, unet, noise_scheduler, device, weight_dtype):
    """Freeze; place (frozen parts in weight_dtype); add LoRA or make the UNet trainable in fp32; gradient
    checkpointing, compile, EMA, the loss scale. `vae` may be None (scripts/benchmark.py with cached latents)."""
    from diffusers import UNet2DConditionModel

    for m in text_encoders + [unet] + ([vae] if vae is not None else []):
        m.requires_grad_(False)
    half = weight_dtype != torch.float32  # frozen weights in fp16/bf16, the forward under autocast
    start, te_targets = [], [None, None]
    if args.network_weights:  # before any adapter is added: it reads the layers' plain names
        start, te_targets = read_lora_file(args, unet, text_encoders)
        logger.info("starting from the LoRA of %s: rank %d, alpha %g, %d UNet and %d text-encoder layers",
                    args.network_weights, args.rank, args.lora_alpha, len(start[0]) // 2,
                    (len(start[1]) + len(start[2])) // 2)
    if args.train_text_encoder and (checkpoint := checkpoint_to_resume(args)):
        te_targets = checkpoint_text_targets(checkpoint, unet, text_encoders)  # (an older trainer's layers too)
    for i, (te, targets) in enumerate(zip(text_encoders, te_targets)):
        place(te, device, weight_dtype)
        if args.train_text_encoder:
            add_lora(te, args, targets or text_encoder_lora_targets(te, pooled=i == len(text_encoders) - 1), half)
    if vae is not None:  # SDXL's own VAE overflows in fp16: fp32 unless its config says it is safe (the fp16-fix's)
        place(vae, device, torch.float32 if vae.config.get("force_upcast", True) else weight_dtype)
    if args.finetune == "lora":
        place(unet, device, weight_dtype)
        add_lora(unet, args, args.lora_target_modules.split(","), half)
        for model, state in zip([unet, *text_encoders], start):
            if state:
                load_adapter_state(model, state, f"--network_weights {args.network_weights}")
    else:
        place(unet, device, torch.float32)  # trained weights stay fp32; autocast does the mixed precision
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders if args.train_text_encoder else []:  # (transformers 5.x renamed it; 4.x has the old)
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    if args.channels_last:  # after LoRA, so conv LoRA weights are channels-last too
        unet.to(memory_format=torch.channels_last)
    if args.compile:
        compile_blocks(unet, args.compile_mode, scope=args.compile_scope)
        if args.gradient_checkpointing and uses_cuda_graphs(args) and args.compile_scope != "transformers":
            # An H100 ran it with the transformers scope (a full fine-tune at 6.5 img/s, 2026-11-27); not yet these.
            logger.warning("--gradient_checkpointing under CUDA graphs has run on a GPU with --compile_scope "
                           "transformers only; if torch fails inside a graph with --compile_scope %s, use that one "
                           "or --compile_mode default", args.compile_scope)
    ema = None
    if args.use_ema:  # an fp32 shadow of every UNet weight, averaged after each update
        from diffusers.training_utils import EMAModel
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=unet.config)
        ema.to(device)
    loss_scale = 1.0
    if args.normalize_loss_weights:
        loss_scale = 1.0 / debias_loss.mean_weight(noise_scheduler.alphas_cumprod, args.loss_weighting,
                                                   noise_scheduler.config.prediction_type, args.snr_gamma,
                                                   args.min_timestep, args.max_timestep).item()
    return Models(tokenizers, text_encoders, vae, unet, noise_scheduler, weight_dtype, loss_scale, ema)


def place(module, device, dtype):
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        with quiet_diffusers():  # its "modules to keep in float32: []" notice on every cast
            module.to(dtype=dtype)


TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_encoder_lora_targets(te, pooled):
    """TEXT_ENCODER_LORA_TARGETS in the layers whose output SDXL uses: up to the penultimate one, and the last
    one too in the encoder whose pooled output it takes (encode_prompt). A LoRA on text encoder 1's last layer
    never trains (its B stays 0) and makes DDP search every step for the gradients it never gets. Names without
    transformers 4's `text_model.`, so that the file's metadata matches the model under either version."""
    last = unused_layer(te)
    return [n.removeprefix("text_model.") for n, _ in te.named_modules()
            if n.rsplit(".", 1)[-1] in TEXT_ENCODER_LORA_TARGETS and (pooled or last not in n)]


def unused_layer(te):
    """The name part of a text encoder's last layer (text encoder 1's feeds nothing SDXL uses)."""
    return f"encoder.layers.{te.config.num_hidden_layers - 1}."


# Only inits that leave the base weights alone: pissa/olora rewrite W, so an exported LoRA would not apply to
# the original model.
INIT_LORA_WEIGHTS = {"gaussian": "gaussian", "default": True, "orthogonal": "orthogonal"}


def add_lora(model, args, targets, half_precision):
    """A peft LoRA adapter on `targets`; its parameters are kept in fp32 under mixed precision (`half_precision`:
    the frozen weights are fp16/bf16 and the forward runs under autocast)."""
    from peft import LoraConfig

    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:  # peft would skip a misspelt name silently as long as another one matches
        raise UserError(f"--lora_target_modules: {', '.join(unmatched)} matches no layer of the "
                        f"{type(model).__name__}; SDXL's are e.g. to_q,to_k,to_v,to_out.0 (attention), "
                        "ff.net.0.proj,ff.net.2 (feed-forward), proj_in,proj_out, conv1,conv2 (resnets)")

    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        init_lora_weights=INIT_LORA_WEIGHTS[args.init_lora_weights], use_dora=args.use_dora,
                        target_modules=targets)
    # The initial LoRA is drawn from --seed alone, not from whatever randomness loading the model took (from a
    # checkpoint file or a folder, with one diffusers or another): one command line, one starting point. (peft
    # draws it on the CPU, then moves it to the layer's device.)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(args.seed, "lora", type(model).__name__))
        try:
            if hasattr(model, "set_adapters"):  # a diffusers model
                model.add_adapter(config)
            else:  # transformers' add_adapter demands a newer peft than may be installed; this is what it does
                from peft import inject_adapter_in_model
                inject_adapter_in_model(config, model, adapter_name="default")
                model.peft_config = {"default": config}
        except ValueError as e:  # a layer type peft has no LoRA for (a GroupNorm), an init its conv LoRA lacks
            raise UserError(f"peft cannot put this LoRA on the {type(model).__name__} (--lora_target_modules, "
                            f"--init_lora_weights, --use_dora): {first_line(e)}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if half_precision and not args.use_dora and not args.lora_dropout:
        # Mixed precision runs the forward under autocast, where the LoRA matmuls are half precision whatever
        # their input's dtype. peft's cast of each input to the fp32 LoRA weights' dtype is then a full-size copy
        # there and back for nothing: ~2,000 ops a step on SDXL, which is host time at batch 1 and memory
        # traffic at batch 4. The result is bit for bit the same; not so with DoRA's norms or dropout's scale,
        # which are computed on the cast input, so those keep it.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False


def lora_file_path(path):
    """--network_weights' file: the path, or an output folder's pytorch_lora_weights.safetensors."""
    return os.path.join(path, "pytorch_lora_weights.safetensors") if os.path.isdir(path) else path


def check_lora_file(args):
    """--network_weights names a readable LoRA file before anything loads; its LoRA settings are the run's, so
    flags that set others conflict."""
    flag = f"--network_weights {args.network_weights!r}"
    path = lora_file_path(args.network_weights)
    if not os.path.exists(path):
        raise UserError(f"{flag} does not exist" if path == args.network_weights else
                        f"{flag} is a folder without pytorch_lora_weights.safetensors: pass the LoRA file")
    if not path.lower().endswith(".safetensors"):
        raise UserError(f"{flag}: a LoRA is read from a .safetensors file")
    keys = checkpoint_file_keys(flag, path)
    if not holds_lora(keys):
        raise UserError(f"{flag} holds no LoRA layers (lora_down/lora_up, lora_A/lora_B): LyCORIS (LoHa, LoKr) "
                        "and whole models are not read as a starting LoRA")
    for name in ("use_dora", "init_lora_weights"):
        if getattr(args, name) not in (None, False, "gaussian"):
            raise UserError(f"--{name} with {flag}: a run started from a LoRA file trains that LoRA; drop --{name}")


def read_lora_file(args, unet, text_encoders):
    """--network_weights as peft states for [unet, text_encoder, text_encoder_2] ({} where the file has none)
    and the text encoders' targets (None where it has none), with the run's rank, alpha and UNet targets set
    from it. Keys in kohya's format (`lora_unet_<path with _>`, SGM's layout as write_kohya_lora writes it, or
    diffusers'; `.lora_down/.lora_up.weight`, `.alpha`, which is the rank where missing, as kohya reads it;
    `lora_te1_`, `lora_te2_`) or diffusers' (`unet.<path>.lora_A/.lora_B.weight`; alpha in its metadata, else
    in train_config.json beside it, else the rank, as diffusers' scripts train). One rank and one alpha."""
    from safetensors import safe_open

    flag, path = f"--network_weights {args.network_weights!r}", lora_file_path(args.network_weights)
    models = (unet, *text_encoders)
    layer_names = lora_layer_names(models)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    layers, alphas = {}, {}
    for key, value in tensors.items():
        stem, part = split_lora_key(key)
        if stem not in layer_names:
            raise UserError(f"{flag}: {key} is no LoRA layer of this SDXL's (LyCORIS, DoRA, or a LoRA of another "
                            "model?): only plain LoRA files of SDXL are read")
        if part == "alpha":
            alphas[layer_names[stem]] = float(value)
        else:
            layers.setdefault(layer_names[stem], {})[part] = value
    if any(len(t) != 2 for t in layers.values()):
        raise UserError(f"{flag} holds halves of layers (a down weight without its up weight, or the reverse)")
    ranks = {t["lora_A"].shape[0] for t in layers.values()}
    if len(ranks) != 1:
        raise UserError(f"{flag} has layers of ranks {sorted(ranks)}: only a LoRA of one rank throughout is read")
    rank = ranks.pop()
    if not alphas:  # a diffusers file: alpha per model in its metadata (diffusers >= 0.34), or our train_config
        saved = lora_file_alphas(args.network_weights, metadata, flag)
        alphas = {layer: saved.get(layer[0], rank) for layer in layers}
    found_alphas = {float(alphas.get(layer, rank)) for layer in layers}  # (kohya: no .alpha means alpha = rank)
    if len(found_alphas) != 1:
        raise UserError(f"{flag} has layers of several alphas ({', '.join(f'{a:g}' for a in sorted(found_alphas))}): "
                        "only a LoRA of one alpha throughout is read")
    names = [[n for i, n in layers if i == m] for m in range(3)]
    adopt_lora_settings(args, unet, flag, rank, found_alphas.pop(), names[0])
    if (names[1] or names[2]) and not args.train_text_encoder:
        raise UserError(f"{flag} trains the text encoders too: add --train_text_encoder (or pass a UNet-only LoRA)")
    states = [{} for _ in models]
    for (i, name), t in layers.items():
        states[i].update({f"{name}.{part}.weight": v.float() for part, v in t.items()})
    return states, [lora_targets(te, n) if n else None for te, n in zip(text_encoders, names[1:])]


def checkpoint_text_targets(checkpoint, unet, text_encoders):
    """The text encoders' LoRA targets of a checkpoint's LoRA file, so that a resumed run has its layers:
    checkpoints of this trainer before 2026-11-27 also have text encoder 1's last layer."""
    from safetensors import safe_open

    path = os.path.join(checkpoint, "pytorch_lora_weights.safetensors")
    if not os.path.exists(path):
        return [None, None]  # (named by resume() as damaged)
    layer_names, names = lora_layer_names((unet, *text_encoders)), [set(), set(), set()]
    with safe_open(path, "pt") as f:
        for key in f.keys():
            stem, _ = split_lora_key(key)
            if stem in layer_names:
                names[layer_names[stem][0]].add(layer_names[stem][1])
    return [lora_targets(te, sorted(n)) if n else None for te, n in zip(text_encoders, names[1:])]


def lora_layer_names(models):
    """Every name a LoRA file may give a layer of (unet, text_encoder, text_encoder_2) -> (model index, module
    name): kohya's `lora_unet_<path with _>` in SGM's layout or diffusers', `lora_te1_…`, `lora_te2_…`, and
    diffusers' `unet.<path>`, `text_encoder.<path>` (CLIP-L with or without `text_model.`: transformers 5
    dropped that level)."""
    unet, names = models[0], {}
    for i, (kohya, diffusers, model) in enumerate(zip(("lora_unet_", "lora_te1_", "lora_te2_"),
                                                      ("unet.", "text_encoder.", "text_encoder_2."), models)):
        clip = "text_model." if flattened_clip(model) else ""
        for name in lora_capable(model):
            for form in {clip + name, sgm_path(name, unet.config)} if i == 0 else {clip + name, name}:
                names[kohya + form.replace(".", "_")] = names[diffusers + form] = (i, name)
    return names


def adopt_lora_settings(args, unet, flag, rank, alpha, unet_layers):
    """The run's --rank, --lora_alpha and --lora_target_modules become the LoRA file's; a flag given with
    another value is refused (one given with the same, as a --config rerun gives them, is not). Targets are the
    same when they pick the same layers, in whatever order or form."""
    found = {"rank": rank, "lora_alpha": alpha}
    if unet_layers:  # (a text-encoder-only file leaves the UNet's targets to the flags)
        found["lora_target_modules"] = ",".join(lora_targets(unet, unet_layers))
    same = {"lora_target_modules": lambda a, b: picked_layers(unet, a.split(",")) == picked_layers(unet, b.split(","))}
    wrong = [f"--{k} {getattr(args, k)}" for k, v in found.items()
             if k in args.lora_flags_given and not same.get(k, operator.eq)(getattr(args, k), v)]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: {flag} has its own ({', '.join(f'{k} {v}' for k, v in found.items())}); "
                        "drop the flag")
    vars(args).update(found)


def lora_file_alphas(source, metadata, flag):
    """{model index: alpha} a diffusers-format LoRA file records: in its metadata (diffusers >= 0.34 writes
    peft's config per model), else, in an output folder of this trainer, its train_config.json."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        config = config if isinstance(config, dict) else {}
    except ValueError:  # metadata some other tool wrote: as if none
        config = {}
    if any(config.get(f"{part}.{pattern}") for part in ("unet", "text_encoder", "text_encoder_2")
           for pattern in ("rank_pattern", "alpha_pattern")):
        raise UserError(f"{flag} has per-layer ranks or alphas (peft's rank_pattern/alpha_pattern): only a LoRA of "
                        "one rank and alpha throughout is read")
    found = {i: float(config[f"{part}.lora_alpha"]) for i, part in enumerate(("unet", "text_encoder", "text_encoder_2"))
             if config.get(f"{part}.lora_alpha") is not None}
    run = os.path.join(source if os.path.isdir(source) else os.path.dirname(source), "train_config.json")
    if not found and os.path.isfile(run):
        with suppress(ValueError, OSError, TypeError, KeyError), open(run) as f:
            found = dict.fromkeys(range(3), float(json.load(f)["lora_alpha"]))
    return found


LORA_KEY_ENDS = ((".lora_down.weight", "lora_A"), (".lora_up.weight", "lora_B"), (".alpha", "alpha"),  # kohya
                 (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),  # peft's, ours
                 (".lora.down.weight", "lora_A"), (".lora.up.weight", "lora_B"),  # diffusers' scripts
                 (".lora_linear_layer.down.weight", "lora_A"), (".lora_linear_layer.up.weight", "lora_B"))
# Layer names as target lists give them (diffusers' and kohya's defaults, the resnets', CLIP's).
KNOWN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2", "conv_shortcut", "time_emb_proj", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def split_lora_key(key):
    """A LoRA file's key as (its layer's name in the file, lora_A / lora_B / alpha), or (None, None)."""
    return next(((key[:-len(end)], part) for end, part in LORA_KEY_ENDS if key.endswith(end)), (None, None))


def lora_capable(model):
    """The names of a model's layers a LoRA can sit on (Linear, Conv2d)."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def picked_layers(model, targets):
    """The layers a target list picks, as peft matches them (the name, or its end after a dot)."""
    return {n for n in lora_capable(model) if any(n == t or n.endswith("." + t) for t in targets)}


def lora_targets(model, names):
    """A target list for exactly these layers of `model`: their short names (to_q, ff.net.0.proj), else with
    their parent (attn1.to_q: a LoRA on some attention layers only), else the full names."""
    def short(name, parent):
        parts = name.split(".")
        known = next((k for k in KNOWN_TARGETS if name == k or name.endswith("." + k)), None)
        size = len(known.split(".")) if known else 2 if parts[-1].isdigit() else 1
        return ".".join(parts[-size - parent:])

    for parent in (0, 1):
        targets = sorted({short(n, parent) for n in names})
        if picked_layers(model, targets) == set(names):
            return targets
    return sorted(n.removeprefix("text_model.") for n in names)  # (see text_encoder_lora_targets)


def compile_blocks(unet, mode="default", backend="inductor", scope="blocks"):
    """Regional compilation: each transformer/resnet block is compiled once per distinct shape and reused,
    instead of tracing the whole UNet (which took 322 s to warm up on an H100).

    `scope` (--compile_scope) trades warm-up for fewer, larger graphs: "transformers" compiles each
    Transformer2DModel whole (SDXL has 11, holding its 70 transformer blocks) and the resnets between them;
    "stages" each down, mid and up block. Fewer graphs mean fewer CUDA graph replays, and less eager code between
    them, per step: what limits batch 1 under CUDA graphs.

    With gradient checkpointing on, every checkpoint is moved inside a compiled region, where dynamo traces the
    recomputation into the region's backward graph. diffusers checkpoints each resnet and transformer block from
    its parent: for a compiled block that is a call from outside, which runs the block's graph again in the
    backward pass, and CUDA graphs cannot replay that safely (pytorch issue 154306; an H100 run ended in "graph
    recording observed an input tensor deallocate"). So the parents stop checkpointing, and each resnet and
    transformer block checkpoints itself, inside whichever region holds it: what diffusers recomputes, plus the
    mid block's first resnet (which diffusers runs unchecked), a little less memory for a little more compute."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    # SDXL's UNet has 12 distinct resnet shapes (channels x resolution) and every aspect-ratio bucket adds more;
    # past dynamo's default of 8 compiles per function the rest would silently run eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if scope == "stages":
        regions = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    else:
        outer = {"blocks": BasicTransformerBlock, "transformers": Transformer2DModel}[scope]
        regions = [m for m in unet.modules() if isinstance(m, (outer, ResnetBlock2D))]
    if unet.is_gradient_checkpointing:
        for m in unet.modules():
            if getattr(m, "gradient_checkpointing", False):
                m.gradient_checkpointing = False
            if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)):
                m.forward = checkpointed(m.forward)
    for module in regions:
        module.compile(mode=None if mode == "default" else mode, backend=backend)


def checkpointed(forward):
    """`forward` under non-reentrant activation checkpointing while gradients are on (training), as diffusers'
    own checkpointing does it; plain under no_grad (validation)."""
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


_SDPA_ORDER = None  # the sdpa_kernel context prefer_sdpa_backend holds open


def prefer_sdpa_backend(name):
    """Put one attention kernel first in SDPA's order, for the whole process (the UNet's attention calls
    F.scaled_dot_product_attention; --compile's blocks are compiled after this is set). The others stay
    enabled behind it, so a shape the chosen kernel rejects still runs. "auto" restores PyTorch's own order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global _SDPA_ORDER
    if _SDPA_ORDER is not None:  # the benchmark switches between configurations
        _SDPA_ORDER.__exit__(None, None, None)
        _SDPA_ORDER = None
    if name == "auto":
        return
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = [kernels[name]] + [k for k in kernels.values() if k != kernels[name]]
    _SDPA_ORDER = sdpa_kernel(order, set_priority=True)  # a reference: released, it would restore the old order
    _SDPA_ORDER.__enter__()


def uses_cuda_graphs(args):
    """--compile modes that capture the compiled blocks as CUDA graphs."""
    return args.compile and args.compile_mode in ("reduce-overhead", "max-autotune")


def eager_inference(args):
    """Validation runs the compiled blocks eagerly. Its no-grad, classifier-free-guidance shapes would otherwise
    compile anew in the middle of the run (a minute or more), and under CUDA graphs every denoising step would
    record new graphs. (torch < 2.6 has no stances: there it compiles, and validate() refuses CUDA graphs.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if args.compile and set_stance else nullcontext()


def param_groups(args, m, lr_scale=1.0):
    """The trainable parameters: the UNet's (LoRA or all), then the text encoders' LoRA with their own lr."""
    groups = [{"params": [p for p in m.unet.parameters() if p.requires_grad], "lr": args.learning_rate * lr_scale}]
    if args.train_text_encoder:
        groups.append({"params": [p for te in m.text_encoders for p in te.parameters() if p.requires_grad],
                       "lr": (args.learning_rate if args.text_encoder_lr is None else args.text_encoder_lr) * lr_scale})
    return groups


def build_optimizer(args, params, device):
    """AdamW (fused: one kernel for all parameters, and it can skip a step on the device, see NonFiniteGuard),
    8-bit AdamW, Adafactor or Prodigy (validate() checked the optional packages). `params`: parameter groups,
    each with its own lr."""
    betas, eps, wd, lr = (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay, params[0]["lr"]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                 fused=device.type in ("cuda", "cpu"))
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    import prodigyopt
    return prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=wd)


def build_pipeline(args, m, unet, text_encoders=None, for_saving=False):
    """`unet` with the base model's other parts and inference scheduler, as a StableDiffusionXLPipeline.

    For validation it reuses the loaded (possibly half-precision) frozen parts. For saving it reloads them in
    fp32, the trained UNet's precision, so the output has one dtype (load it with torch_dtype as any pipeline)."""
    from diffusers import StableDiffusionXLPipeline

    if for_saving:  # fp32 like the trained UNet, also when --variant loaded fp16 files: one dtype in the output
        parts = {"torch_dtype": torch.float32}
        if args.pretrained_vae_model_name_or_path:  # the output carries the VAE it was trained with
            parts["vae"] = load_vae(args, torch_dtype=torch.float32)
        pipe = base_pipeline(args, unet=unet, **parts)
    else:
        te1, te2 = text_encoders or m.text_encoders
        parts = dict(vae=m.vae, text_encoder=te1, text_encoder_2=te2, unet=unet)
        # A checkpoint file's parts are all loaded: the pipeline is built from them, not the file read again.
        # A folder's tokenizers are left for from_pretrained to load: diffusers refuses transformers 4's
        # CLIPTokenizerFast, which is no subclass of the CLIPTokenizer that model_index.json names.
        if m.sampler is not None:
            pipe = StableDiffusionXLPipeline(**parts, tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1],
                                             scheduler=type(m.sampler).from_config(m.sampler.config))
        else:
            pipe = base_pipeline(args, **parts)
    if args.prediction_type:  # what the UNet was trained to predict, for sampling and in the saved config
        pipe.scheduler.register_to_config(prediction_type=args.prediction_type)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# 3. data
# ----------------------------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("image", "img", "images", "image_path", "file_name", "path", "jpg", "png", "webp")  # + webdataset's
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "prompts", "description", "sentence", "txt")
# PIL warns above 89 MP and refuses above 179 MP as a guard against decompression bombs; training images are
# the user's own, and phones now take 200 MP photos. Refuse above 512 MP (named as unreadable), and don't print
# PIL's warning that calls each photo above 256 MP a possible attack.
Image.MAX_IMAGE_PIXELS = 256_000_000
# Likewise a PNG whose compressed text (a ComfyUI workflow, XMP) unpacks past 1 MB: Pillow refused the whole image.
PngImagePlugin.MAX_TEXT_CHUNK = 64 << 20
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A camera's broken EXIF block: the pixels read fine (upright as stored); Pillow's warning names no file.
warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF data")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff", ".apng",
              ".tga", ".jp2", ".j2k", ".jpf", ".jpx", ".dib", ".pbm", ".pgm", ".ppm", ".pnm")  # (all in imagefolder's too)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Notepad's "Unicode" and PowerShell's > write first
DATA_FILES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv",
              ".tar": "webdataset"}  # (WebDataset shards: 000001.jpg + 000001.txt, read as columns jpg and txt)


DATASETS_BUILDERS = ("imagefolder", "audiofolder", "videofolder", "webdataset", "json", "csv", "parquet", "arrow",
                     "text", "pandas", "sql", "xml", "spark", "generator", "cache")


def load_table(args):
    """The training table (a `datasets.Dataset`) with an image column (undecoded) and a caption column.

    Sources: a Hub dataset id; a local imagefolder (images + metadata.jsonl/csv/parquet); a local folder of
    images with same-name .txt or .caption files (kohya's layout); a downloaded Hub dataset (parquet/arrow/json
    files); a `save_to_disk` folder; one .parquet/.arrow/.jsonl/.csv file. Images are decoded later, in the
    loader workers.
    """
    import datasets

    source = os.path.expanduser(args.train_data_dir or args.dataset)
    if os.sep == "/" and os.path.exists(source):  # data// or data/ (a shell's completion): imagefolder found none
        source = re.sub(r"(?<=.)/+$", "", re.sub(r"//+", "/", source))
    if os.path.isdir(source):
        table = load_folder(source, args)
    elif os.path.isfile(source):
        builder = DATA_FILES.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise UserError(f"dataset file {source!r} is not one of {', '.join(DATA_FILES)}: pass a folder or "
                            "such a file")
        unused_flags(args, "one data file", "dataset_config_name", "dataset_split", "caption_extension")
        check_metadata_file(source, metadata=False)
        table = guarded_load(source, datasets.load_dataset, builder, data_files=glob.escape(source),
                             cache_dir=args.cache_dir)
    elif source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in DATA_FILES:
        raise UserError(f"dataset {'file' if os.path.splitext(source)[1] else 'folder'} {source!r} does not exist")
    elif source.lower() in DATASETS_BUILDERS:  # datasets would read the working folder with that loader
        raise UserError(f"--dataset {source!r} is the name of one of datasets' loaders, not a dataset: pass the folder "
                        f"or file of your data, e.g. --dataset path/to/images")
    else:
        unused_flags(args, "a Hub dataset", "caption_extension")
        table = guarded_load(source, datasets.load_dataset, source, args.dataset_config_name,
                             cache_dir=args.cache_dir)
    table = train_split(table, source, None if os.path.isfile(source) else args.dataset_split)
    if "__key__" in table.column_names and os.path.exists(source) and (odd := odd_webdataset_sample(source, False)):
        raise UserError(f"the WebDataset shards of {source!r} differ{odd}")
    if table.features and all(isinstance(f, dict) and {"caption", "tags"} & set(f) for f in table.features.values()):
        raise UserError(f"{source!r} is kohya's metadata JSON (image name -> caption/tags, for its --in_json), which "
                        "this trainer does not read: write each caption to a .txt file beside its image, or a "
                        "metadata.jsonl with file_name and text")
    try:
        image_col = pick_column(table.column_names, args.image_column, IMAGE_COLUMNS, "image")
    except UserError:  # else the one column of images by its type: a WebDataset's .jpeg members, a `photo` column
        typed = [c for c, f in (table.features or {}).items() if isinstance(f, datasets.Image)]
        if args.image_column or len(typed) != 1:  # (two, say input_image and edited_image: which is the data?)
            raise
        image_col = typed[0]
        logger.info("dataset %s: images from its column %r, the one column of images", source, image_col)
    try:
        caption_col = pick_column(table.column_names, args.caption_column, CAPTION_COLUMNS, "caption")
    except UserError as e:  # images beside a captions.csv that datasets does not know to read as metadata
        files = list_files(source) if os.path.isdir(source) else []
        tables = [f for f in files if os.path.splitext(f)[1].lower() in (".csv", ".jsonl", ".parquet")
                  and os.path.basename(f) not in METADATA_FILES]  # (metadata.* are read)
        if not tables or args.caption_column or not any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for f in files):
            raise
        raise UserError(f"{e}. If {tables[0]!r} holds the captions: pass it as --dataset (its image paths relative "
                        f"to it), or rename it metadata{os.path.splitext(tables[0])[1].lower()} with a file_name "
                        "column") from None
    if image_col == caption_col:
        raise UserError(f"--image_column and --caption_column are both {image_col!r}: name two different columns "
                        f"(the dataset has: {', '.join(table.column_names)})")
    feature = table.features[image_col]
    item = item_feature(feature)
    if isinstance(item, datasets.Image) or getattr(item, "dtype", None) in ("string", "large_string"):
        raise UserError(f"image column {image_col!r} of dataset {source!r} holds several images per row: this "
                        "trainer takes one image per row (a row per image, or --image_column naming such a column)")
    encoded = (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("binary", "large_binary")
               or isinstance(feature, dict) and {"bytes", "path"} & set(feature))  # {bytes, path}, or one of them
    if encoded:
        table = table.cast_column(image_col, datasets.Image(decode=False))  # encoded bytes too: {bytes, path}
    table = table.select_columns([image_col, caption_col]).rename_columns({image_col: "image", caption_col: "text"})
    if isinstance(table.features["text"], datasets.ClassLabel):  # a classification dataset: train on the class names
        table = class_names(table)
    if getattr(table.features["text"], "dtype", "").startswith("float"):  # a CSV's numbers with a blank cell are
        import pyarrow.compute as pc  # floats: "3" trains, as typed, not "3.0" (arrow's cast; images untouched)
        texts = pc.cast(table.with_format("arrow")["text"], "string")
        table = replace_column(table, "text", texts, datasets.Value("string"), "captions as text")
    if getattr(table.features["text"], "dtype", "") in ("binary", "large_binary"):  # WebDataset's .caption members:
        import pyarrow as pa  # datasets decodes .txt as text, other extensions not
        import pyarrow.compute as pc
        try:
            texts = pc.cast(table.with_format("arrow")["text"], "string")
        except pa.ArrowInvalid:
            raise UserError(f"caption column {caption_col!r} of dataset {source!r} holds bytes that are not UTF-8 "
                            "text: pass --caption_column naming a text column, or save the captions as UTF-8") from None
        table = replace_column(table, "text", texts, datasets.Value("string"), "captions decoded")
    if getattr(table.features["text"], "dtype", "") in ("string", "large_string"):
        # A Windows editor's byte-order mark, as WebDataset .txt members keep it: dropped, as read_caption does.
        import pyarrow.compute as pc
        texts = table.with_format("arrow")["text"]
        if pc.any(pc.starts_with(texts, "\ufeff")).as_py():
            table = replace_column(table, "text", pc.replace_substring_regex(texts, "^\ufeff", ""),
                                   table.features["text"], "byte-order marks dropped")
    if len(table) == 0:
        raise UserError(f"dataset {source!r} has no rows")
    table = table.add_column("row", np.arange(len(table)))  # the dataset's row, for messages after subsets
    if os.path.exists(source):  # relative paths in local data: beside it if there, as in an imagefolder
        table = resolve_paths(table, source, encoded)
    table = drop_rows_without_image(table, image_col, source)
    check_captions(table, source, caption_col)
    if args.max_train_samples:
        table = subset(table, args.max_train_samples, args.seed)
    return table, source


def item_feature(feature, default=None):
    """A list column's item type: List(x) or Sequence(x), or [x] as datasets 3 writes a list of records."""
    return feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", default)


def class_names(table):
    """The caption column of class numbers as the class names, built with arrow (the image bytes beside it are
    neither read nor copied); -1 (no label) is a missing caption."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pa.array(table.features["text"].names, pa.string())
    labels = table.with_format("arrow")["text"]
    labels = pc.if_else(pc.less(labels, 0), pa.scalar(None, labels.type), labels)
    text = pa.chunked_array([pc.take(names, chunk) for chunk in labels.chunks], pa.string())
    return replace_column(table, "text", text, datasets.Value("string"), "names")


def replace_column(table, name, values, feature, salt):
    """`table` with column `name` replaced by the arrow array `values`; the other columns are not touched (a
    Hub parquet's image bytes stay memory-mapped). The new fingerprints are derived from the old one and `salt`:
    given them, datasets hashes nothing (it would otherwise hash `values`, or warn that it could not)."""
    key = hashlib.blake2b(f"{table._fingerprint}:{salt}".encode(), digest_size=16)
    table = table.remove_columns(name, new_fingerprint=key.hexdigest())
    return table.add_column(name, values, feature=feature,
                            new_fingerprint=hashlib.blake2b(key.digest(), digest_size=16).hexdigest())


def subset(table, n, seed):
    """--max_train_samples: n images drawn at random (seeded), with every row of each (kohya's repeats list a
    file once per repeat: drawing rows would take some images twice and leave others out)."""
    import pyarrow as pa

    kind = table.with_format("arrow")["image"].type  # paths, or stored bytes (not worth reading here)
    paths = table["image"] if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None
    if paths is None or len(set(paths)) == len(paths):
        return table.shuffle(seed=seed).select(range(min(n, len(table))))
    distinct = list(dict.fromkeys(paths))
    chosen = set(random.Random(seed).sample(distinct, min(n, len(distinct))))
    return table.select([i for i, p in enumerate(paths) if p in chosen])


def resolve_paths(table, source, encoded):
    """The image column with local data's paths resolved (relative_to): every row of path strings, or the rows of
    {bytes, path} that hold no bytes. The stored bytes of a Hub parquet stay where they are (memory-mapped on
    disk): the new column is built from the old one's arrays, not by mapping rows through Python."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    beside = relative_to(source)
    if not encoded:  # (a fingerprint given: datasets warned on every run that it could not hash the function)
        fingerprint = hashlib.blake2b(f"{table._fingerprint}:{os.path.abspath(source)}".encode(), digest_size=16)
        return table.map(lambda values: {"image": [beside(v) for v in values]}, input_columns="image", batched=True,
                         batch_size=10_000, keep_in_memory=True, new_fingerprint=fingerprint.hexdigest())
    column = table.with_format("arrow")["image"]  # no rows selected yet: zero-copy
    if not pc.struct_field(column, "bytes").null_count:
        return table
    chunks = []
    for chunk in column.chunks:
        parts = dict(zip((f.name for f in chunk.type), chunk.flatten()))
        no_bytes = parts["bytes"].is_null().to_pylist()
        paths = pa.array([beside(p) if empty else p for p, empty in zip(parts["path"].to_pylist(), no_bytes)],
                         pa.string())
        chunks.append(pa.StructArray.from_arrays([parts["bytes"], paths], names=["bytes", "path"],
                                                 mask=chunk.is_null()))
    return replace_column(table, "image", pa.chunked_array(chunks, chunks[0].type), datasets.Image(decode=False),
                          os.path.abspath(source))


def relative_to(source, quiet=False):
    """A function that resolves an image path of local data: relative to the data file, or to the data folder,
    else to the folder of one of its data files (data/train.jsonl listing images/0.png under data/), else to the
    working directory (paths written from a project's root; said once). Spaces around a file name are dropped
    when only that file exists (trimmed), Windows' backslashes read as folders, file:// dropped. A path found
    nowhere is named beside the data (then as unreadable), never looked for elsewhere. `quiet`: nothing said."""
    bases = [source] if os.path.isdir(source) else [os.path.dirname(os.path.abspath(source))]
    listed = not os.path.isdir(source)  # a folder's data files are looked for at the first path not beside it
    said, said_windows, say = [], [], (lambda *_: None) if quiet else logger.warning

    def more_bases():  # the folders of the data's files, once
        nonlocal listed
        if not listed:
            listed = True
            bases.extend(sorted({os.path.dirname(f) for f in list_files(source)
                                 if os.path.splitext(f)[1].lower() in DATA_FILES} - {source}))

    def resolve(value):
        if not isinstance(value, str) or not value.strip():  # (an empty cell: drop_rows_without_image's)
            return value
        value = value[len("file://"):] if value.startswith("file://") else value
        value = os.path.expanduser(value) if value == "~" or value.startswith("~/") else value  # (as typed)
        if os.sep == "/" and (inner := re.search(r"/([A-Za-z]:[\\/].*)$", value)) and not os.path.exists(value):
            value = inner.group(1)  # an imagefolder's metadata: datasets joined the folder and C:\… into one path
        if os.sep == "/" and WINDOWS_ABSOLUTE.match(value):  # C:\Users\me\set\cat\1.png: another
            more_bases()  # the data files' folders first: the longest tail is looked for under every base
            parts = [p for p in re.split(r"[\\/]", value)[1:] if p]  # machine's path: its longest tail found
            found = next((p for n in range(len(parts)) for base in bases  # under the data, set\cat\1.png first
                          if os.path.exists(p := trimmed(os.path.join(base, *parts[n:])))), None)
            if found and not said_windows:
                said_windows.append(say("image paths of %s such as %r are Windows paths: read as the files under "
                                        "the data that end the same way", source, value))
            return found or value  # (not found: named as written, when it fails to open)
        if os.sep == "/" and "\\" in value and not os.path.exists(value):
            value = value.replace("\\", "/")
        if os.path.isabs(value) or value.startswith(("http://", "https://")):
            return trimmed(value)
        for base in bases:
            for path in dict.fromkeys((os.path.join(base, value), os.path.join(base, value.strip()))):
                if os.path.exists(path := trimmed(path)):
                    return path
        if not listed:
            more_bases()
            return resolve(value)
        if os.path.exists(here := trimmed(os.path.abspath(value))):
            if not said:
                said.append(say("image paths of %s such as %r are found relative to the working directory, not "
                                "to the data", source, value))
            return here
        return os.path.join(bases[0], value)

    return resolve


def trimmed(path, strip=True):
    """`path`; or, when only that exists, the file it meant: a spreadsheet cell with spaces around the name
    ("a.png " in a metadata.csv: datasets joins the cell to the folder as it is), or the same name, or a folder
    above it, with accents composed otherwise (macOS writes "café" decomposed, most editors type it composed)."""
    if os.path.exists(path):
        return path
    head, name = os.path.split(path)
    if not head.isascii() and head != path and not os.path.isdir(head):  # (ASCII has one form: no stat spent)
        head = trimmed(head, strip=False)
    stripped = name.strip() if strip else name
    forms = (stripped, unicodedata.normalize("NFC", stripped), unicodedata.normalize("NFD", stripped))
    for form in dict.fromkeys(forms):
        if (candidate := os.path.join(head, form)) != path and os.path.exists(candidate):
            return candidate
    return path


def drop_rows_without_image(table, column, source):
    """Rows that name no image (null, or an empty file name: the blank rows a spreadsheet leaves at the end of a
    metadata.csv) are counted in a warning and left out (an index over the rows: no image's bytes are read or
    copied). `column`: the image column's name in the dataset, for messages."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.with_format("arrow")["image"]
    empty = lambda strings: pc.fill_null(pc.equal(pc.utf8_trim_whitespace(strings), ""), True)
    if pa.types.is_struct(values.type):  # {bytes, path}: an image if either is there
        missing = pc.and_(pc.is_null(pc.struct_field(values, "bytes")), empty(pc.struct_field(values, "path")))
        missing = pc.or_(pc.is_null(values), missing)
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        missing = empty(values)
    else:
        missing = pc.is_null(values)
    missing = np.asarray(pc.fill_null(missing, True))
    rows, kept = np.flatnonzero(missing), np.flatnonzero(~missing)
    if not len(kept):
        raise UserError(f"no row of dataset {source!r} names an image in column {column!r}")
    if len(rows):
        logger.warning("%d of %d rows of %s name no image (null or an empty file name) and are left out: rows %s",
                       len(rows), len(table), source,
                       ", ".join(map(str, rows[:10])) + (" …" if len(rows) > 10 else ""))
        table = table.select(kept)
    return table


def train_split(table, source, split=None):
    """The split named `split` of a DatasetDict (--dataset_split); else its 'train' split, or its only split
    (a local folder named val/ or test/)."""
    import datasets

    if not isinstance(table, datasets.DatasetDict):
        return table
    split = None if split == "train" else split  # (as without the flag: a lone split trains, whatever its name)
    if split is not None and split not in table and SPLIT_FOLDERS.get(split) in table:
        split = SPLIT_FOLDERS[split]  # (val: validation, as datasets names the split of val.parquet)
    if split is not None and split not in table:
        raise UserError(f"dataset {source!r} has no split {split!r} (it has: {', '.join(table)}): pass one of them "
                        "as --dataset_split")
    if split is not None:
        return table[split]
    if "train" not in table and len(table) == 1:
        logger.info("dataset %s has one split, %r: training on it", source, next(iter(table)))
        return next(iter(table.values()))
    if "train" not in table:
        raise UserError(f"dataset {source!r} has no 'train' split (it has: {', '.join(table)}): pass the one to "
                        "train on as --dataset_split")
    return table["train"]


def blank(caption):
    return caption is None or (not caption.strip() if isinstance(caption, str) else
                               isinstance(caption, (list, tuple)) and all(blank(c) for c in caption))


def check_captions(table, source, column):
    """Rows without a caption (missing, null or empty) train on an empty prompt: say how many, or stop when
    none has one (the wrong column, or metadata datasets did not match to the images). Captions are text, or
    lists of texts (one drawn per sample): a column of records would train on their Python repr."""
    kind = table.features["text"]
    inner = item_feature(kind, kind)
    if getattr(inner, "dtype", None) == "bool":
        raise UserError(f"caption column {column!r} of dataset {source!r} holds true/false values, not text: pass "
                        "--caption_column naming a text column")
    captions = list(table["text"])
    # (A JSON column of text in some rows and records in others is datasets 5's Json feature: by value.)
    record = next((c for c in captions if isinstance(c, dict) or isinstance(c, (list, tuple)) and
                   any(isinstance(x, (dict, list, tuple)) for x in c)), None)  # (a list of lists: its repr)
    if record is not None or isinstance(kind, dict) or isinstance(inner, dict) or \
            getattr(inner, "dtype", "string") in ("binary", "large_binary"):
        example = record if record is not None else next((c for c in captions[:8] if c), None)
        raise UserError(f"caption column {column!r} of dataset {source!r} holds records, not text (e.g. "
                        f"{str(example)[:80]!r}): pass --caption_column naming a text column, or flatten it into one")
    empty = [i for i, c in enumerate(captions) if blank(c)]
    if len(empty) == len(table):
        raise UserError(f"every caption in column {column!r} of dataset {source!r} is empty: check --caption_column "
                        "and the captions")
    if empty:
        logger.warning("%d of %d images have no caption (missing, null or empty) and train with an empty prompt, "
                       "e.g. %s", len(empty), len(table), describe_image(table[empty[0]]["image"],
                                                                         table[empty[0]]["row"]))


def load_folder(source, args):
    """A local folder: saved with save_to_disk, an imagefolder with metadata, kohya's image + caption files, or
    data files (a Hub dataset downloaded with `hf download --local-dir`; --dataset_config_name: one
    of the configurations its README defines)."""
    import datasets

    output_dir, cache_dir, config = args.output_dir, args.cache_dir, args.dataset_config_name
    if any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
        unused_flags(args, "a folder saved with save_to_disk", "dataset_config_name", "caption_extension",
                     *(("dataset_split",) if os.path.exists(os.path.join(source, "state.json")) else ()))
        return guarded_load(source, datasets.load_from_disk, source)
    outputs = [output_dir] if output_dir and inside(output_dir, source) else []  # (this run's, if not made yet)
    files = list_files(source, exclude=output_dir, outputs=outputs)  # (+ earlier runs')
    metadata = [f for f in files if os.path.basename(f) in METADATA_FILES]
    images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    # Data files make a dataset; a lone .json or .tar beside images is more likely an info file or a backup.
    data_files = any(os.path.splitext(f)[1].lower() in DATA_FILES and not
                     (os.path.splitext(f)[1].lower() in (".json", ".tar") and images) for f in files)
    if metadata:
        unused_flags(args, "an imagefolder (captions from its metadata file)", "dataset_config_name",
                     "caption_extension")
        columns = {f: check_metadata_file(f) for f in metadata}
        sidecars = caption_index(files)
        beside = [p for p in images if caption_files(sidecars, p)]
        if beside:  # two sources of captions: say which one trains
            logger.warning("%d images have caption files (e.g. %s) that are not read: with a metadata file the "
                           "captions come from its column (--caption_column); move the metadata file away to use "
                           "the caption files", len(beside), caption_files(sidecars, beside[0])[0])
        patterns, used, held = split_train_files(source, files, sidecars=False, split=args.dataset_split)  # (escaped)
        read = lambda f: any(glob.escape(f) == p or p.endswith("/**") and glob.escape(f).startswith(p[:-2])
                             for p in patterns)  # (the metadata files datasets is given, not those of test/)
        same_caption_column({f: c for f, c in columns.items() if read(f)}, args.caption_column, source)
        expanded = next((f for f in used + metadata if os.path.expandvars(f) != f), None)  # (what datasets opens)
        if expanded:  # datasets expands $NAME in every path: price$HOME.png was looked for as price/root.png
            raise UserError(f"{expanded!r} names an environment variable, which datasets expands (it looks for "
                            f"{os.path.expandvars(expanded)!r}): rename it without '$' (or '%')")
        with old_pandas_strings():
            table = train_split(guarded_load(source, datasets.load_dataset, "imagefolder",
                                             data_files={"train": patterns}, cache_dir=cache_dir), source)
        table = rows_outside(table, held, source)
        unnamed_images(table, used, source)
        return table
    if images and not data_files:  # image + caption files: train/ trains, a test/ or val/ is held out, as above
        _, images, held = split_train_files(source, files, args.caption_extension, split=args.dataset_split)
        files = [f for f in files if not any(inside(f, d) for d in held)]
    captions = find_captions(source, files, images, args.caption_extension) if images else None
    if captions is not None:
        unused_flags(args, "images with caption files", "dataset_config_name",
                     *(("dataset_split",) if data_files else ()))  # (split folders are read without data files)
        return datasets.Dataset.from_dict(captions)
    if data_files:  # a downloaded Hub dataset; an image beside its parquet files is a preview, not data
        unused_flags(args, "a downloaded dataset's data files", "caption_extension")
        shards = [f for f in files if f.lower().endswith(".tar")]
        if shards and all(os.path.splitext(f)[0] + ".tar" in shards for f in files if f.endswith(".parquet")):
            # img2dataset's output: 00000.tar, and 00000.parquet listing its URLs and statuses, not the images
            return guarded_load(source, datasets.load_dataset, "webdataset", cache_dir=cache_dir,
                                data_files={"train": [glob.escape(f) for f in shards]})
        if glob.has_magic(source):  # datasets would read the path as a pattern and find no files
            raise UserError(f"dataset folder {source!r}: datasets cannot read a downloaded dataset in a folder "
                            "whose path has [ ] or * in it: rename the folder")
        named = split_named_files(source, files) if config is None and args.dataset_split in (None, "train") else {}
        here = os.path.abspath(source)  # (datasets takes "." for no path: "dataset_name should be specified")
        if named.get(None) and "train" not in named and len(named) > 1:  # datasets would train on the val file
            train, rest = named.pop(None), sorted(f for fs in named.values() for f in fs)
            logger.warning("dataset %s: training on %s; %s held out (the name says a split)", source,
                           ", ".join(train), ", ".join(rest))
            return guarded_load(source, datasets.load_dataset, here, cache_dir=cache_dir,
                                data_files={"train": [glob.escape(f) for f in train]})
        if config is None and not readme_configs(source) and outputs:
            # datasets would read their files as data: train_config.json even as the "train" split, by its name
            raise UserError(f"dataset folder {source!r} holds an output folder of this trainer, {outputs[0]!r}, "
                            "whose files datasets would read as data: move it out of the dataset folder (and keep "
                            "--output_dir outside it)")
        return guarded_load(source, datasets.load_dataset, here, config, cache_dir=cache_dir)
    if not images:
        archives = [f for f in files if f.lower().endswith((".zip", ".tar.gz", ".tgz", ".7z", ".rar"))]
        raise UserError(f"dataset folder {source!r} has no images (looked for {', '.join(IMAGE_EXTS)}) and no data "
                        "files" + (f"; {archives[0]} is an archive: extract it first" if archives else ""))
    tables = [f for f in files if os.path.splitext(f)[1].lower() in DATA_FILES]  # not read beside images
    near = kohya_near_miss(source, images, caption_index(files, args.caption_extension))
    which = f"{args.caption_extension} file" if args.caption_extension else ".txt (or .caption) file"
    hint = ""
    if tables and kohya_metadata(tables[0]):
        hint = f"; {tables[0]!r} is kohya's metadata JSON (for its --in_json), which this trainer does not read"
    elif tables:
        hint = f"; if {tables[0]!r} holds the captions, pass it as --dataset"
    raise UserError(f"dataset folder {source!r} has {len(images)} images but no captions: put a same-name {which} "
                    "next to each image, or a metadata.jsonl with file_name and text columns" + hint
                    + (f" ({near})" if near else ""))


def kohya_metadata(path):
    """Whether `path` is kohya's metadata JSON: {image name: {"caption" or "tags": ...}} (its --in_json)."""
    if not path.lower().endswith(".json"):
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and {"caption", "tags"} & set(v) for v in data.values())


SPLIT_WORD = re.compile(r"(?:^|[-._ 0-9/])(train|training|validation|valid|val|dev|test|testing|eval|evaluation)"
                        r"(?:[-._ 0-9/]|$)")


def readme_configs(source):
    """Whether a downloaded dataset's README defines its configurations (datasets then reads the files they name)."""
    with suppress(OSError):
        with open(os.path.join(source, "README.md"), encoding="utf-8", errors="replace") as f:
            return "configs:" in f.read().split("\n---", 1)[0]
    return False


def split_named_files(source, files):
    """A downloaded dataset's data files by the split their path names, as datasets reads it (None: no split
    word), when its README defines no configs (then datasets follows those). Only files of the split files'
    format count, never datasets' own dataset_info(s).json or config.json; one of another format is refused."""
    if readme_configs(source):
        return {}
    from datasets.data_files import FILES_TO_IGNORE  # (config.json, dataset_infos.json, …: datasets' own)

    not_data = {*FILES_TO_IGNORE, "state.json"}
    named = {}
    for f in files:
        if DATA_FILES.get(os.path.splitext(f)[1].lower()) and os.path.basename(f) not in not_data:
            word = SPLIT_WORD.search(os.path.relpath(f, source).replace(os.sep, "/"))
            named.setdefault(SPLIT_FOLDERS[word.group(1)] if word else None, []).append(os.path.relpath(f, source))
    kind = lambda f: DATA_FILES[os.path.splitext(f)[1].lower()]
    kinds = {kind(f) for split, fs in named.items() if split for f in fs}
    others = named.pop(None, [])
    unsplit = [f for f in others if kind(f) in kinds]  # (a stray notes.json beside parquet shards)
    if others and named and not unsplit and "train" not in named:  # datasets would train on the val file alone
        raise UserError(f"dataset {source!r}: {others[0]!r} says no split and {next(iter(named.values()))[0]!r} a "
                        "held-out one, in another format: pass the file to train on as --dataset")
    return {**named, None: unsplit} if unsplit else named


def unused_flags(args, kind, *flags):
    """Say so when a data flag given has no effect on this kind of data, rather than ignore it without a word."""
    for flag in flags:
        if getattr(args, flag):
            logger.warning("--%s %r is not used: the data is %s", flag, getattr(args, flag), kind)


# The folder names datasets' imagefolder reads as splits (case-sensitively, at any depth), and the split each names.
SPLIT_FOLDERS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
                 "evaluation": "test"}


def split_train_files(source, files, extension=None, sidecars=True, split=None):
    """The data files of a folder's training data, as datasets' patterns, and the images among them: all
    of it, or its train/ folders. Given the folder alone, datasets also reads split names out of file names and
    other folder names: `dog_test_04.png` or a `test_shots/` folder became a test split, and the run trained on
    the rest without a word. Here only a folder named exactly as a split is one (`train/`, `data/train/`), as in
    datasets' documented layout, and only if it holds images or metadata. Images outside the split folders train
    when there is no train/ and they have captions of their own (a metadata file; with `sidecars`, caption files
    or a kohya folder): a test/ or val/ beside them is held out. Beside train/ they are named as unused. `split`
    (--dataset_split) names another split folder to train on. Returns (patterns, the images, the held-out split
    folders)."""
    data = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS or os.path.basename(f) in METADATA_FILES]
    images = lambda paths: [f for f in paths if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    splits, loose, folder_of = {}, [], {}
    for f in data:
        parts = os.path.relpath(f, source).split(os.sep)[:-1]
        depth = next((i for i, part in enumerate(parts) if part in SPLIT_FOLDERS), None)  # the outermost
        if depth is None:
            loose.append(f)
        else:
            folder_of[f] = os.path.join(source, *parts[:depth + 1])
            splits.setdefault(SPLIT_FOLDERS[parts[depth]], set()).add(folder_of[f])
    split = SPLIT_FOLDERS.get(split, split)  # (--dataset_split val: the validation split, as its folder says)
    split = None if split == "train" else split  # (as without the flag: images beside a test/ folder train too)
    if not splits:
        if split:
            logger.warning("--dataset_split %r is not used: dataset %s has no split folders", split, source)
        return [os.path.join(glob.escape(source), "**")], images(data), []
    held_out = ", ".join(os.path.relpath(d, source) for ds in splits.values() for d in sorted(ds))
    captions = caption_index(files, extension)

    def captioned(image):  # a caption file beside it, or a kohya DreamBooth folder (its name captions it)
        parts = os.path.relpath(image, source).split(os.sep)
        return bool(caption_files(captions, image)) or (len(parts) > 1 and bool(KOHYA_FOLDER.match(parts[0])))

    own = bool(images(loose)) and (any(os.path.basename(f) in METADATA_FILES for f in loose)
                                   or sidecars and any(map(captioned, images(loose))))
    if split and split not in splits:
        raise UserError(f"dataset {source!r} has no {split} split folder (it has: {held_out}): pass one of theirs "
                        "as --dataset_split")
    if not split and "train" not in splits and own:  # the images, and a test/ or val/ folder kept apart from them
        logger.warning("dataset %s: training on its %d images outside its split folders; %s is left out",
                       source, len(images(loose)), held_out)
        return [glob.escape(f) for f in loose], images(loose), sorted(d for ds in splits.values() for d in ds)
    name = split or ("train" if "train" in splits else next(iter(splits)))
    if name != "train" and len(splits) > 1 and not split:
        raise UserError(f"dataset {source!r} has no train/ folder (it has split folders: {held_out}); name one "
                        "train/, or pass the folder of the split you want")
    if name != "train" and not split:
        logger.info("dataset %s has one split folder, %s: training on it", source, held_out)
    chosen = sorted(splits[name])
    held = sorted(d for ds in splits.values() for d in ds if d not in chosen)
    inside = [f for f in data if folder_of.get(f) in chosen]
    patterns = [os.path.join(glob.escape(d), "**") for d in chosen]
    above = [f for f in loose if os.path.basename(f) in METADATA_FILES]
    if above and not any(os.path.basename(f) in METADATA_FILES for f in inside):
        # A metadata file above the split folders (file_name: train/a.png) is theirs: what it names trains. With
        # another split named, the images beside the split folders are held out too (they train by default).
        if split:
            return patterns + [glob.escape(f) for f in above], images(inside), held + images(loose)
        return patterns + [glob.escape(f) for f in above], images(inside) + images(loose), held
    if images(loose):
        logger.warning("%d images of dataset %s are outside its %s folder and are not used (e.g. %s): move them "
                       "into it", len(images(loose)), source, os.path.relpath(chosen[0], source), images(loose)[0])
    return patterns, images(inside), held


def rows_outside(table, held, source):
    """The rows whose image is not in a held-out split folder: datasets' imagefolder yields every row of a
    metadata file, those naming test/ images too (one metadata file above train/ and test/)."""
    import pyarrow.compute as pc

    if not held or "image" not in table.column_names:
        return table
    paths = pc.struct_field(table.with_format("arrow")["image"], "path").to_pylist()
    keep = [not p or not any(inside(p, d) for d in held) for p in paths]
    if not all(keep):
        logger.warning("%d rows of the metadata of %s name images in held-out split folders (e.g. %s): not used",
                       keep.count(False), source, paths[keep.index(False)])
        table = table.select([i for i, k in enumerate(keep) if k])
    return table


def unnamed_images(table, images, source):
    """datasets' imagefolder leaves out, without a word, images its metadata does not name: name them, with a
    hint when a row names one of them in another case. Rows naming one image twice each train: said too.
    Every image column counts (file_name, and *_file_name such as a ControlNet's conditioning images)."""
    import pyarrow.compute as pc

    import datasets

    columns = [c for c, f in (table.features or {}).items() if isinstance(f, datasets.Image)]  # conditioning images too
    if not columns:
        return
    resolve = relative_to(source, quiet=True)  # as load_table will (a Windows path in file_name, say)
    named = {c: [resolve(p) for p in pc.struct_field(table.with_format("arrow")[c], "path").to_pylist() if p]
             for c in columns}
    counts = collections.Counter(os.path.realpath(p) for p in named[columns[0]])  # the training images
    used = {os.path.realpath(p) for paths in named.values() for p in paths}
    unused = [f for f in images if os.path.realpath(f) not in used]
    named = [p for paths in named.values() for p in paths]
    if unused:
        on_disk = {f.lower(): f for f in unused}
        cased = [(p, on_disk[p.lower()]) for p in named if not os.path.exists(p) and p.lower() in on_disk]
        hint = (f" (the metadata names {os.path.basename(cased[0][0])!r}, the file is "
                f"{os.path.basename(cased[0][1])!r}: file_name must match in case)") if cased else ""
        logger.warning("%d of %d images in %s are not named in its metadata and are not used%s: %s", len(unused),
                       len(images), source, hint, ", ".join(os.path.relpath(f, source) for f in unused[:10])
                       + (" …" if len(unused) > 10 else ""))
    twice = [(p, n) for p, n in counts.items() if n > 1]
    if twice:
        logger.warning("%d images are named by more than one metadata row, each row a sample of its own: %s",
                       len(twice), ", ".join(f"{os.path.relpath(p, os.path.realpath(source))} x{n}"
                                             for p, n in twice[:10]) + (" …" if len(twice) > 10 else ""))


@contextmanager
def old_pandas_strings():
    """datasets < 4.6 reads metadata.csv with pandas and finds file_name only if it is Value('string'); pandas 3
    reads text as large_string, so every metadata.csv failed with '`file_name` ... must be present'."""
    import pandas as pd
    if int(pd.__version__.split(".")[0]) < 3:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*future.infer_string")
        with pd.option_context("future.infer_string", False):
            yield


def check_metadata_file(path, metadata=True):
    """What spreadsheets, shells and hand-written scripts put in a CSV or JSON Lines file that datasets reads as
    nonsense or fails on with a parser's message: one line each, naming the file, the line and the fix.
    `metadata`: an imagefolder's metadata file, which also needs a file_name column."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".csv", ".jsonl"):
        return parquet_columns(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        if os.path.islink(path) and not os.path.exists(path):
            raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist: replace it with the file"
                            ) from None
        fix = "fix its permissions" if e.errno in (errno.EACCES, errno.EPERM) else "check the file and the disk"
        raise UserError(f"cannot read {path}: {e.strerror}; {fix}") from None
    if head.startswith(LFS_POINTER):
        raise UserError(f"{path} is a Git LFS pointer, not the data: run `git lfs pull` in the dataset's repository")
    if head.startswith(UTF16_BOMS):
        raise UserError(f"{path} is UTF-16: save it as UTF-8 (in PowerShell: Out-File -Encoding utf8)")
    first = head.split(b"\n", 1)[0]
    if kind == ".csv" and b"," not in first and (b";" in first or b"\t" in first):
        raise UserError(f"{path} separates its fields with {'semicolons' if b';' in first else 'tabs'}: save it "
                        "with commas (in Excel: 'CSV UTF-8 (Comma delimited)')")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            columns = csv_columns(path, f) if kind == ".csv" else jsonl_columns(path, f, metadata)
    except UnicodeDecodeError:
        return None  # guarded_load says: not UTF-8
    if columns is None:
        raise UserError(f"{path} has no rows: add a row per image")
    if metadata and not any(re.fullmatch(r"(.*_)?file_names?", c.strip()) for c in columns):  # as datasets does
        near = [c for c in columns if c.strip().lower().replace(" ", "_") in ("file_name", "filename", "file")]
        raise UserError(f"{path} has no file_name column (it has: {', '.join(c.strip() for c in columns)}): "
                        + (f"rename {near[0]!r} to file_name" if near else "add one naming each image's file"))
    return columns


def parquet_columns(path):
    """A parquet file's column names (its schema only), None when it cannot be read (datasets then says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names if path.lower().endswith(".parquet") else None
    except Exception:
        return None


def same_caption_column(columns, requested, source):
    """The metadata files of one imagefolder (metadata.jsonl at the top and in sub/) must name their captions
    alike: datasets reads every file with the columns of one of them, in no fixed order, so a sub/ file's
    `caption` beside a top file's `text` trained half the captions, a different half from run to run."""
    picks = {}
    for path, names in columns.items():
        if names is not None:
            try:
                picks[path] = pick_column(names, requested, CAPTION_COLUMNS, "caption", quiet=True)
            except UserError:
                picks[path] = None
    first = next(iter(picks.items()), (None, None))
    other = next(((path, col) for path, col in picks.items() if col != first[1]), None)
    if other:
        say = lambda path, col: f"{os.path.relpath(path, source)} has " + ("no caption column" if col is None
                                                                         else repr(col))
        raise UserError(f"the metadata files of {source!r} name their captions differently ({say(*first)}, "
                        f"{say(*other)}), and datasets reads them all with the columns of one: give every metadata "
                        "file the same caption column")


def csv_columns(path, f):
    """A CSV's header (its names as written), None without rows; a row with more fields than the header is named
    (pandas would read the first as an index; fewer is a row with empty cells, read as such)."""
    rows = csv.reader(f)
    header = next(rows, None)
    if header and header[0].startswith("sep="):  # Excel's separator hint, which pandas reads as the header
        raise UserError(f"{path} starts with Excel's {','.join(header)!r} line: delete that line")
    count = 0
    for count, row in enumerate(rows, 1):
        if len(row) > len(header):
            raise UserError(f"{path}: line {rows.line_num} has {len(row)} fields, the header {len(header)}: a caption "
                            "with a comma in it must be in double quotes (spreadsheets and pandas' to_csv write so)")
    return header if header and count else None  # (as written: datasets keeps " text" as " text")


def jsonl_columns(path, f, metadata=True):
    """The keys of a JSON Lines file, None without rows; a line that is not a JSON object, or a key holding text
    in one row and numbers in another (or lists, in a metadata file: datasets stops on both there), is named."""
    kinds, keys = {}, {}
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if number == 1 and line.lstrip().startswith("["):  # an indented array: its first line alone is no JSON
                raise UserError(f"{path} is one JSON array: write one JSON object per line (JSON Lines)") from None
            raise UserError(f"{path}: line {number} is not valid JSON ({e})") from None
        if number == 1 and isinstance(row, list):
            raise UserError(f"{path} is one JSON array: write one JSON object per line (JSON Lines)")
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object ({{\"file_name\": ..., \"text\": ...}})")
        for key, value in row.items():
            keys.setdefault(key, None)
            kind = "text" if isinstance(value, str) else "lists" if isinstance(value, list) and metadata else \
                "numbers" if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if kind and kinds.setdefault(key, (kind, number))[0] != kind:
                raise UserError(f"{path}: {key!r} holds {kinds[key][0]} on line {kinds[key][1]} and {kind} on line "
                                f"{number}: " + ("write numbers meant as text in quotes" if "numbers" in (kind,
                                kinds[key][0]) else "make them all lists, or all text"))
    return list(keys) or None


@contextmanager
def held_logs(name):
    """Log records of `name`'s loggers held back, and let through only if the block succeeds: datasets logs a
    bad file's error (twice) before raising it, and the error line that follows says it once."""
    records, source = [], logging.getLogger(name)
    hold = logging.Handler()
    hold.emit = records.append
    propagate, source.propagate = source.propagate, False
    handlers, source.handlers = source.handlers, [hold]
    try:
        yield
    finally:
        source.propagate, source.handlers = propagate, handlers
    for record in records:
        source.handle(record)


def guarded_load(name, fn, *a, **kw):
    try:
        with held_logs("datasets"):
            return fn(*a, **kw)
    except Exception as e:  # datasets raises many types for "not found / offline / bad files"
        reason = first_line(e)
        if e.__cause__ is not None:  # "An error occurred while generating the dataset": the cause says which
            reason += f": {first_line(e.__cause__)}"
        text = f"{e}\n{e.__cause__ or ''}"
        hint = "" if os.path.exists(name) else " (check the id; offline, only local folders and cached datasets load)"
        if not os.path.exists(name) and os.path.isdir(name.split("/")[0]):
            hint = f" (nor is it a local folder: {name!r} does not exist)"
        if any(isinstance(x, UnicodeDecodeError) for x in (e, e.__cause__, e.__context__)):
            hint = non_utf8_member(name) or (" (a metadata or data file is not UTF-8: save it as UTF-8, in Excel "
                                             "as 'CSV UTF-8')")
        if "Couldn't cast" in text:  # the rest of datasets' message is two schemas, many lines long
            hint = (" (the data files disagree on their columns or types: a column missing in one file, or images "
                    "stored as paths in one and as bytes in another; make them alike)")
        if "not NoneType" in text and fn.__name__ == "load_dataset" and a[:1] == ("imagefolder",):  # datasets < 4.8
            hint = (" (a row of the metadata file has no file_name, e.g. the blank rows a spreadsheet leaves at the end: "
                    "delete them, or upgrade datasets to 4.8 or newer, which skips them)")
        if "should be in WebDataset format" in text:
            hint = odd_webdataset_sample(name) or (" (a .tar here is an archive, not WebDataset shards of "
                                                   "000001.jpg + 000001.txt: extract it first)")
        if "::" in name and os.path.exists(name):  # fsspec's chain separator: zip://a.png::data.zip
            hint = " (datasets reads '::' in a path as a chain of file systems: rename it without '::')"
        if "must be a relative path" in text:  # imagefolder refuses /abs/a.png and ../a.png in file_name
            hint = (" (an imagefolder's metadata names its images relative to the metadata file's folder: write "
                    "file_name so, or pass the metadata file itself as --dataset, which reads any path)")
        if "metadata files with different extensions" in text:
            hint = " (keep one metadata file per folder: metadata.jsonl, metadata.csv or metadata.parquet)"
        if "Config name is missing" in text:
            configs = re.search(r"available configs: (\[.*?\])", text)
            hint = f" (pass --dataset_config_name, one of {configs.group(1) if configs else 'its configs'})"
        pointers = [f for f in local_files(name) if os.path.splitext(f)[1].lower() in DATA_FILES and lfs_pointer(f)]
        if pointers:
            hint = f" ({pointers[0]} is a Git LFS pointer, not the data: run `git lfs pull` in the dataset's repository)"
        raise UserError(f"cannot load dataset {name!r}: {reason}{hint}") from None


WEBDATASET_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")  # key, fields: as datasets splits a name


def odd_webdataset_sample(name, within=True):
    """A hint naming WebDataset shards whose fields differ (datasets reads every shard with the first one's
    columns: the rows of a shard of .png where the first has .jpg lost their images), or with `within`, the first
    sample whose files differ from the others' in its shard (an image missing: datasets refuses the shard);
    "" when all are alike. Hidden members (macOS' ._ files) are skipped, as datasets skips them."""
    usual_of = {}
    for tar in shards_of(local_files(name)):  # member names only, no data read: fast even on large shards
        try:
            with tarfile.open(tar) as t:
                samples = {}
                for m in t.getmembers():
                    match = WEBDATASET_MEMBER.match(m.name) if m.isfile() else None
                    if match and not os.path.basename(m.name).startswith((".", "__")):  # (as datasets skips them)
                        samples.setdefault(match.group(1), set()).add(match.group(2))
        except (OSError, tarfile.TarError):
            continue
        kinds = collections.Counter(frozenset(e) for e in samples.values())
        if within and len(kinds) > 1:
            usual = kinds.most_common(1)[0][0]
            key, exts = next((k, e) for k, e in samples.items() if e != usual)
            return (f" ({tar}: sample {key!r} has {', '.join(sorted(exts))} where the others have "
                    f"{', '.join(sorted(usual))}: give every sample the same files, or extract the archive if it is "
                    "not WebDataset shards)")
        if kinds:
            usual_of[tar] = kinds.most_common(1)[0][0]
    first = next(iter(usual_of.items()), None)
    media = lambda field: "." + field.split(".")[-1].lower() in (*IMAGE_EXTS, *CAPTION_EXTS)
    lacking = next(((t, k) for t, k in usual_of.items() if any(map(media, k - first[1]))), None)
    if lacking:  # datasets reads every shard with the first one's columns: the others' own images are lost
        (a, kind_a), (b, kind_b) = first, lacking
        return (f" ({a} holds {', '.join(sorted(kind_a))} and {b} {', '.join(sorted(kind_b))}: datasets "
                "reads every shard with the first one's columns, so give every shard's samples the same file types)")
    return ""


def local_files(name):
    """The files of local data: a folder's (list_files), a file itself, or none (a Hub id)."""
    return list_files(name) if os.path.isdir(name) else [name] if os.path.isfile(name) else []


def shards_of(files, most=16):
    """The first `most` .tar files: what the WebDataset hints look into (enough to find an odd shard, without
    reading a terabyte of them on an error path)."""
    return [f for f in files if f.lower().endswith(".tar")][:most]


def non_utf8_member(name, budget=256 * 2**20):
    """A hint naming the first text member (.txt, .json, .cls: datasets decodes those) of a WebDataset shard
    that is not UTF-8, where datasets stops without saying where; "" when none is found in the first 16 shards
    and `budget` bytes read, or when a metadata file is there to blame instead."""
    files = local_files(name)
    if any(os.path.basename(f) in METADATA_FILES for f in files):
        return ""
    for tar in shards_of(files):
        with suppress(OSError, tarfile.TarError), tarfile.open(tar) as t:
            for m in t:
                if budget <= 0:
                    return ""
                if m.isfile() and os.path.splitext(m.name)[1].lower() in (".txt", ".json", ".cls"):
                    budget -= m.size
                    try:
                        t.extractfile(m).read().decode("utf-8")
                    except UnicodeDecodeError:
                        return (f" ({m.name} in {tar} is not UTF-8: save the captions as UTF-8 and pack the "
                                "shards again)")
    return ""


LFS_POINTER = b"version https://git-lfs."


def lfs_pointer(path):
    """Whether `path` is a Git LFS pointer (a Hub repository cloned without git-lfs) instead of its content."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


CAPTION_EXTS = (".txt", ".caption")
# Synology's thumbnails (@eaDir/IMG_1.JPG/SYNOPHOTO_THUMB_XL.jpg: a copy of every photo, five sizes) and recycle
# bins, QNAP's, Windows': images, but not the data. In lower case: Windows writes $Recycle.Bin and $RECYCLE.BIN.
SYSTEM_FOLDERS = {"@eadir", "#recycle", "#snapshot", "@recycle", "@recently-snapshot", "$recycle.bin",
                  "system volume information"}


def list_files(folder, exclude=None, outputs=None):
    """Every file below `folder`, in a stable order, symlinked subfolders followed once (loops cut), leaving out
    `exclude` (our output folder, which may sit inside the dataset and holds sample images), an earlier run's
    output folder (it holds train_config.json; appended to `outputs` when given), and hidden files and folders
    (.ipynb_checkpoints copies, macOS' ._ resource forks and __MACOSX, as datasets' imagefolder does), and the
    thumbnail and recycle folders NAS boxes and Windows put in shared folders (SYSTEM_FOLDERS)."""
    files, misnamed, special, seen, skip = [], [], [], set(), os.path.realpath(exclude) if exclude else None
    hidden = lambda n: n.startswith((".", "__MACOSX")) or n.lower() in SYSTEM_FOLDERS

    def unreadable(e):
        logger.warning("cannot read folder %s (%s): its images are not used", e.filename, e.strerror)

    for root, dirs, names in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen or real == skip:
            dirs[:] = []
            continue
        if "train_config.json" in names and root != folder:  # an earlier run's outputs: loss plot, sample grids
            logger.warning("skipping %s: an output folder of this trainer (train_config.json), not data", root)
            if outputs is not None:
                outputs.append(root)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not hidden(d))  # sorted: which path of a folder seen twice is kept
        for n in names:
            if not hidden(n):  # (the path below `folder`: a folder's name may be the one that is not UTF-8)
                path = os.path.join(root, n)
                if not os.path.isfile(path) and os.path.exists(path):  # a pipe or a device: reading it would hang
                    special.append(path)
                    continue
                (files if utf8_name(os.path.relpath(path, folder)) else misnamed).append(path)
    if special:
        logger.warning("skipping %d entries that are not files (pipes, sockets, devices; e.g. %s)", len(special),
                       special[0])
    if misnamed:  # an unzipped Windows archive can have thousands: one line, not one each
        logger.warning("skipping %d file(s) whose names are not valid UTF-8 (e.g. %r): rename them to use them",
                       len(misnamed), misnamed[0])
    return sorted(files, key=lambda f: (os.path.dirname(f), os.path.basename(f)))  # folder by folder, as always


def utf8_name(name):
    """False for a name that is not valid UTF-8, as unzipped Windows archives have: datasets cannot store it."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_caption(path):
    """A caption file's text: UTF-8 (a byte-order mark dropped), UTF-16 with its mark (Notepad's "Unicode") or
    without, UTF-32 with its mark, or else Windows-1252 (older Western editors), said in a warning, rather than
    garbled silently."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read caption file {path!r}: {e.strerror}; fix its permissions or remove it") from None
    for marks, codec in (((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "utf-32"), (UTF16_BOMS, "utf-16")):
        if data.startswith(marks):  # (UTF-32's little-endian mark begins as UTF-16's: it is tried first)
            try:
                return data.decode(codec).strip()
            except UnicodeDecodeError:
                raise UserError(f"caption file {path!r} starts with a {codec.upper()} mark but is not {codec.upper()} "
                                "(cut short?): save it again, as UTF-8") from None
    odd, even = data[1::2].count(0), data[0::2].count(0)
    if max(odd, even) > len(data) / 6:  # UTF-16 without its mark: ASCII's zero bytes, a third of one parity or more
        codec = "utf-16-le" if odd > even else "utf-16-be"
        try:
            text = data.decode(codec)
            if all(c.isprintable() or c.isspace() for c in text):
                logger.warning("caption file %s is UTF-16 without a byte-order mark; read as %s", path, codec)
                return text.strip()
        except UnicodeDecodeError:
            pass
    data = data.replace(b"\x00", b"")  # stray NULs a script wrote
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        logger.warning("caption file %s is not UTF-8; read as Windows-1252 (save it as UTF-8 to be sure)", path)
        return data.decode("cp1252", errors="replace").strip()


KOHYA_FOLDER = re.compile(r"^(\d{1,3})_(.+)$")  # kohya's DreamBooth folders: "<repeats>_<caption>", e.g. "10_sks dog"


def kohya_folders(source, images, captioned):
    """{folder: (repeats, words)} when every image in a subfolder sits in a folder named as kohya's DreamBooth
    folders are, `<repeats>_<words>` directly under `source`, and no image beside them has a caption (a preview
    picture, say, which kohya does not read either); else None."""
    folders = {}
    for path in images:
        parts = os.path.relpath(path, source).split(os.sep)
        if len(parts) == 1:
            if captioned(path):
                return None
            continue
        match = KOHYA_FOLDER.match(parts[0])
        if match is None or int(match.group(1)) < 1:
            return None
        folders[parts[0]] = (int(match.group(1)), match.group(2).strip())
    return folders or None


def name_key(path):
    """How an image finds its caption file: case ignored (IMG_1.JPG + IMG_1.TXT), and accents in either Unicode
    form (a name copied from a Mac, decomposed, beside one typed elsewhere, composed)."""
    return unicodedata.normalize("NFC", path).lower()


def caption_index(files, extension=None):
    """{name_key of a path less its caption extension: the caption files} (caption_files picks an image's);
    `extension` (--caption_extension): only files with that one."""
    exts = (extension.lower(),) if extension else CAPTION_EXTS
    captions = {}
    for f in files:
        stem, ext = os.path.splitext(f)
        if ext.lower() in exts:
            captions.setdefault(name_key(stem), []).append(f)
    return captions


def caption_files(captions, image, own_first=False):
    """An image's caption files, the one it uses first: IMG_1.txt for IMG_1.JPG (as kohya reads it), then
    IMG_1.JPG.txt as some taggers name them; .txt before .caption. `own_first`: another image shares the name
    (IMG_1.png), so IMG_1.JPG.txt, which names this image alone, comes before the shared IMG_1.txt. One named
    exactly as the image wins over those that match only with case ignored: cat.png and Cat.png, each with its own
    caption, do not share one."""
    stem = os.path.splitext(image)[0]
    found = captions.get(name_key(stem), []) + captions.get(name_key(image), [])
    names = {unicodedata.normalize("NFC", stem), unicodedata.normalize("NFC", image)}
    exact = [f for f in found if unicodedata.normalize("NFC", os.path.splitext(f)[0]) in names]
    return sorted(exact or found, key=lambda f: (os.path.splitext(f)[1].lower() != ".txt",
                                                 own_first and name_key(os.path.splitext(f)[0]) != name_key(image)))


def kohya_near_miss(source, images, captions):
    """Why folders that look like kohya's DreamBooth folders are not read as such (their repeats and folder
    captions unused), and what to do; "" when none looks like one."""
    parts = [os.path.relpath(p, source).split(os.sep) for p in images]
    tops = sorted({r[0] for r in parts if len(r) > 1})
    looks = [t for t in tops if KOHYA_FOLDER.match(t)]  # (2023_trip/ is a year, not 2023 repeats)
    if not looks:
        below = sorted({os.path.join(*r[:2]) for r in parts if len(r) > 2 and KOHYA_FOLDER.match(r[1])})
        # kohya would repeat 1500_sks/ 1500 times and caption its uncaptioned images "sks"; here a number this
        # long is taken as part of the name (2023_trip/). Said only where that leaves an image uncaptioned.
        numbered = sorted({r[0] for r, p in zip(parts, images) if len(r) > 1 and re.match(r"\d{4,}_.", r[0])
                           and not caption_files(captions, p)})
        if KOHYA_FOLDER.match(os.path.basename(os.path.normpath(source))) and not tops:  # the folder itself
            return (f"its name is one of kohya's DreamBooth folders, <repeats>_<caption>: pass its parent folder "
                    f"{os.path.dirname(os.path.abspath(source))!r} to read it as such")
        if numbered and not below:
            return (f"folders {', '.join(map(repr, numbered[:5]))} are read as plain folders (no repeats, no "
                    "captions from folder names): a number of 4 digits or more is taken as part of a name, like a "
                    "year; name kohya's DreamBooth folders <repeats>_<words> with 1 to 999 repeats")
        if not below:
            return ""
        return (f"{below[0]} looks like one of kohya's DreamBooth folders: pass its parent folder "
                f"{os.path.join(source, os.path.dirname(below[0]))!r} as the data to read them as such")
    bad = [t for t in looks if int(KOHYA_FOLDER.match(t).group(1)) < 1]
    others = [t for t in tops if t not in looks]
    loose = [r[0] for r, p in zip(parts, images) if len(r) == 1 and caption_files(captions, p)]
    why = (f"{bad[0]!r} repeats its images 0 times (kohya's folders take 1 to 999)" if bad
           else f"{others[0]!r} beside them is not named <repeats>_<words>" if others
           else f"{loose[0]!r} beside them has a caption file" if loose else "")
    return (f"folders {', '.join(map(repr, looks[:5]))} look like kohya's DreamBooth folders but are read as plain "
            f"folders (no repeats, no captions from folder names): {why}") if why else ""


def find_captions(source, files, images, extension=None):
    """kohya layout: each image's caption from a same-name .txt (or .caption) file next to it, extension case
    ignored (IMG_1.JPG + IMG_1.TXT), "" without one. In kohya's DreamBooth folders (kohya_folders) an image
    without a caption file is captioned with its folder's words, and each image counts `repeats` times an
    epoch, as kohya trains them. Returns columns (absolute paths), or None if no image has a caption."""
    captions = caption_index(files, extension)
    kohya = kohya_folders(source, images, lambda path: bool(caption_files(captions, path)))
    if kohya:
        say = logger.warning if any(n > 1 for n, _ in kohya.values()) else logger.info  # repeats change the mix
        bare = collections.Counter(os.path.relpath(p, source).split(os.sep)[0] for p in images
                                   if not caption_files(captions, p))
        say("kohya DreamBooth folders, each image counted N times an epoch: %s", "; ".join(
            f"{name!r} x{n}" + (f" ({bare[name]} image(s) without a caption file captioned {words!r})" if bare[name]
                                else "") for name, (n, words) in sorted(kohya.items())))
        loose = [path for path in images if os.sep not in os.path.relpath(path, source)]
        if loose:
            logger.warning("%d uncaptioned image(s) beside kohya's DreamBooth folders are left out, as kohya does: %s",
                           len(loose), ", ".join(os.path.basename(p) for p in loose[:10]))
            images = [path for path in images if os.sep in os.path.relpath(path, source)]
    paths, texts, differing, users = [], [], [], {}
    stems = collections.Counter(name_key(os.path.splitext(p)[0]) for p in images)
    for path in images:
        found = caption_files(captions, path, own_first=stems[name_key(os.path.splitext(path)[0])] > 1)
        if found:
            users.setdefault(found[0], []).append(os.path.basename(path))
        repeats, words = kohya[os.path.relpath(path, source).split(os.sep)[0]] if kohya else (1, "")
        text = (read_caption(found[0]) if found else "") or words  # an empty caption file: the folder's words
        if len(found) > 1 and any(read_caption(f) != text for f in found[1:]):
            differing.append(found)
        paths += [os.path.abspath(path)] * repeats
        texts += [text] * repeats
    if differing:  # a .txt of tags beside a .caption of sentences, say: which one trains is the user's choice
        logger.warning("%d images have caption files that differ (e.g. %s): the first is used (.txt before .caption, "
                       "IMG.txt before IMG.jpg.txt unless an IMG.png shares it); pass --caption_extension to pick one "
                       "kind, or remove the file not meant", len(differing), " and ".join(differing[0]))
    shared = [(caption, names) for caption, names in users.items() if len(names) > 1]
    if shared:  # a.png converted to a.webp, the original kept: the same picture would train twice as often
        caption, names = shared[0]
        logger.warning("%d caption files each caption several images of one name (e.g. %s for %s): each image "
                       "trains; if they are copies of one picture in other formats, remove the copies",
                       len(shared), os.path.basename(caption), ", ".join(names))
    warn_unsupported(source, files, captions, images)
    if not any(texts):
        return None  # (load_folder's error says why kohya's folders were not read as such)
    near = "" if kohya else kohya_near_miss(source, images, captions)
    if near:
        logger.warning("%s", near)
    return {"image": paths, "text": texts}  # check_captions counts the empty


def warn_unsupported(source, files, captions, images):
    """Files with a caption that are not images we read (an iPhone's .HEIC, a .jxl, a .psd) were meant as
    training data: say they are left out rather than drop them silently."""
    used = {name_key(key) for p in images for key in (os.path.splitext(p)[0], p)}
    unused = captions.keys() - used
    text_files = {f for fs in captions.values() for f in fs}
    left = [f for f in files if (name_key(os.path.splitext(f)[0]) in unused or name_key(f) in unused)
            and f not in text_files and os.path.splitext(f)[1].lower() not in CAPTION_EXTS]
    if left:
        kinds = sorted({os.path.splitext(f)[1] for f in left})
        logger.warning("%d captioned files in %s are not images this trainer reads (%s), e.g. %s: not used; "
                       "convert them to JPEG or PNG", len(left), source, ", ".join(kinds), left[0])


def pick_column(columns, requested, candidates, kind, quiet=False):
    """The column named `requested`, else the first of `candidates` present. Names match with stray spaces around
    them, as a CSV header typed "file_name, text" has. `quiet`: no warning when several are present."""
    names = {c.strip(): c for c in columns}
    if requested:
        if requested.strip() not in names:
            raise UserError(f"--{kind}_column {requested!r} is not in the dataset; its columns are: {', '.join(columns)}")
        return names[requested.strip()]
    found = [names[c] for c in candidates if c in names]
    if not found:  # "Image,Caption" typed in a spreadsheet, IMG_1.PNG + IMG_1.TXT in a WebDataset shard
        lower = {c.strip().lower(): c for c in reversed(columns)}
        found = [lower[c] for c in candidates if c in lower]
    if len(found) > 1 and not quiet:  # "text" and "caption" both there: which one trains is worth a look
        logger.warning("%s column %r is used; the dataset also has %s: pass --%s_column to use another", kind,
                       found[0], ", ".join(map(repr, found[1:])), kind)
    if found:
        return found[0]
    hint = ""
    if kind == "caption" and "label" in columns:  # imagefolder without usable metadata: subfolders as classes
        hint = (" (to train on the class names of its 'label' column, pass --caption_column label; if these are your "
                "own images, datasets found no metadata and read their subfolders as class labels: put a "
                "metadata.jsonl beside the images, in each split folder such as train/)")
    if kind == "caption" and "__key__" in columns:  # WebDataset: each member's extension is a column
        hint = (" (WebDataset shards need a caption beside each image, 000001.jpg + 000001.txt; a .tar of "
                "something else is an archive: extract it first)")
    media = lambda c: os.path.splitext(str(c))[1].lower() in (*IMAGE_EXTS, *CAPTION_EXTS)
    dotted = [c for c in columns if "." in str(c) and media(c)] if "__key__" in columns else []
    if dotted:  # img.v2.0.png: key "img", field "v2.0.png"
        hint = (f" (datasets splits each WebDataset member's name at its first dot, so {dotted[0]!r} is a field of "
                "its own: rename the members with one dot, before the extension, e.g. 000001.png + 000001.txt; or, "
                "if every sample's fields are named alike, pass them as --image_column and --caption_column)")
    if sum(os.path.splitext(str(c))[1].lower() in IMAGE_EXTS for c in columns) > len(columns) / 2:
        hint = (" (this file is one object mapping file names to captions: write it as JSON Lines, one "
                "{\"file_name\": ..., \"text\": ...} object per line)")
    shown = ", ".join(map(str, columns[:12])) + (f", … ({len(columns)} columns)" if len(columns) > 12 else "")
    raise UserError(f"no {kind} column found among: {shown}; name it with --{kind}_column{hint}")


def open_file(value):
    """A PIL image, not yet decoded, from a datasets Image value ({'bytes', 'path'}), encoded bytes or a path
    (or a PIL image, as it is)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") else value["path"]
    if not value:  # b"" or None: a row without image data
        raise ValueError("empty image data")
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ValueError("a URL: images are not downloaded, download them and list the files")
    try:
        return full_resolution_page(Image.open(io.BytesIO(value) if isinstance(value, bytes) else value))
    except FileNotFoundError:
        if isinstance(value, str) and os.path.islink(value):
            raise ValueError(f"a broken link to {os.readlink(value)}") from None
        raise
    except Image.DecompressionBombError:  # (Pillow's words call it a possible attack)
        raise ValueError(f"larger than the {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} MP this trainer reads: "
                         "downscale it") from None
    except UnidentifiedImageError:  # (its message names a BytesIO object, or repeats the path)
        raise ValueError(why_not_an_image(value)) from None


def full_resolution_page(img):
    """A TIFF whose first page is a thumbnail (NewSubfileType bit 0: "reduced resolution", as raw converters
    write them) opened at its first full-size page instead; any other image as it is."""
    if img.format == "TIFF" and img.tag_v2.get(254, 0) & 1:
        for page in range(1, getattr(img, "n_frames", 1)):
            img.seek(page)
            if not img.tag_v2.get(254, 0) & 1:
                if 34675 not in img.tag_v2:  # Pillow keeps a thumbnail's ICC profile for pages without one
                    img.info.pop("icc_profile", None)
                return img
        img.seek(0)  # thumbnails only: the first
    return img


def why_not_an_image(value):
    """What a file Pillow cannot identify is, where it can be told from its first bytes."""
    head = value[:32] if isinstance(value, bytes) else b""
    if isinstance(value, str):
        with suppress(OSError), open(value, "rb") as f:
            head = f.read(32)
    if isinstance(value, str) and not head:
        return "an empty file (0 bytes)"
    if head.startswith(LFS_POINTER):
        return "a Git LFS pointer, not the image: run `git lfs pull` in the dataset's repository"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"):
        return "a HEIC/HEIF image (an iPhone's format), whatever its extension: convert it to JPEG"
    return "not an image file Pillow can read"


def displayed_size(img, header_only=False):
    """(width, height) as displayed, after EXIF rotation. `header_only`: a PNG's orientation from its header
    alone: to look for an eXIf chunk after the pixels (rare) Pillow decodes the whole image, 19 ms a megapixel,
    which made the scan of a PNG dataset decode every image once more."""
    w, h = img.size
    if img.format == "TIFF":  # Pillow 11+ gives a rotated TIFF's size upright already, older ones as stored
        w, h = img.tag_v2.get(256, w), img.tag_v2.get(257, h)  # (ImageWidth, ImageLength): as stored, for both
    # Pillow's base getexif reads what the header holds (eXIf, ImageMagick's text chunk, XMP) without decoding.
    exif = Image.Image.getexif(img) if header_only and img.format == "PNG" else img.getexif()
    return (h, w) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def upright_rgb(img):
    """EXIF orientation applied, and sRGB: a colour profile applied, transparency composited on white, 16-bit and
    float greyscale scaled to 8 bits."""
    img = ImageOps.exif_transpose(img)
    # Transparency is an alpha channel, or one colour marked transparent (palette, greyscale and RGB PNGs).
    if img.mode in ("LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    elif img.mode == "P" and "icc_profile" in img.info:  # its palette's colours are in that profile too
        img = img.convert("RGB")
    img = to_srgb(img)
    if img.mode == "RGBA":  # transparent pixels become white, not black
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16"):  # always the 16-bit range: a dark 16-bit image stays dark
            arr = arr / 257.0
        elif img.mode == "F" and arr.max() <= 1.0:  # float images in [0, 1] (e.g. TIFF from image tools)
            arr = arr * 255.0
        elif arr.max() > 255:  # 32-bit integers: 16-bit data, unless the values say 8-bit
            arr = arr / 257.0
        key = img.info.get("transparency")  # a 16-bit PNG's transparent grey level (tRNS): white, as above
        if isinstance(key, int):
            arr[np.asarray(img) == key] = 255
        img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def to_srgb(img):
    """The pixels in sRGB, what SDXL was trained on and what a generated image is shown as. An embedded colour
    profile other than sRGB is applied, as browsers and viewers do: an iPhone's Display P3 photo read as sRGB
    trains duller colours (P3 red (200, 120, 80) is sRGB (213, 115, 70)), an Adobe RGB camera file more so, and a
    print CMYK file's naive conversion is far off. Untagged RGB is sRGB; a profile lcms cannot read, or of another
    colour space than the pixels, is ignored (the pixels as they are)."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        transform = srgb_transform(icc, img.mode)
        return img if transform is None else ImageCms.applyTransform(img, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError, ImportError):  # (a Pillow built without lcms)
        return img


@functools.lru_cache(maxsize=32)  # per loader worker: a photo collection has a handful of profiles
def srgb_transform(icc, mode):
    """lcms' transform from the profile `icc` (bytes) to sRGB; None for an sRGB profile (nothing to do: most
    tagged images, saved ~60 ms per 6 MP)."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if mode != "CMYK" and ImageCms.getProfileDescription(profile).strip().lower().startswith("srgb"):
        return None
    return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, "RGBA" if mode == "RGBA" else "RGB")


def open_image(value):
    """The upright RGB image of a datasets Image value, encoded bytes, a path, or a PIL image."""
    return upright_rgb(open_file(value))


def decode_image(value, cover=None, row=None):
    """The upright RGB image with every pixel decoded, and its full displayed (w, h); None (with a warning naming
    the file) when decoding fails. `cover`: the (w, h) the image will be resized to cover. A JPEG far larger than
    that is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales that still covers it: a 24 MP photo for a
    1024² bucket decodes 2-5x faster than at full size, only to be resized down anyway."""
    try:
        img = open_file(value)
        size = displayed_size(img)
        scale = max(cover[0] / size[0], cover[1] / size[1]) if cover else 1.0
        if img.format in ("JPEG", "MPO") and scale < 0.5:  # (MPO: a phone's JPEG with a depth or gain map)
            img.draft(img.mode, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img = upright_rgb(img)
        img.load()
        return img, size
    except Exception as e:  # unreadable, truncated, or gone since the scan
        logger.warning("skipping unreadable image %s: %s", describe_image(value, row), first_line(e),
                       extra=EVERY_PROCESS)
        return None


def read_size(value):
    """(width, height) as displayed (after EXIF rotation), reading only the header."""
    img = open_file(value)
    try:
        return displayed_size(img, header_only=True)
    finally:
        if img is not value:
            img.close()


def image_identity(value):
    """What determines an image's pixels, for cache keys: path + size + mtime, or a hash of embedded bytes."""
    if isinstance(value, dict) and value.get("bytes"):
        return "bytes:" + hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
    path = value["path"] if isinstance(value, dict) else str(value)
    st = os.stat(path)
    return f"file:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def describe_image(value, row=None):
    """How messages name an image: its path, or its row for bytes stored in the dataset (a path is cut short if
    it is no path at all: a base64 string of the image, say)."""
    if isinstance(value, dict):
        value = value.get("path") or (f"the image in row {row}" if row is not None else "an image stored in the data")
    value = str(value)
    if len(value) > 300 and re.fullmatch(r"(data:[^,]*,)?[A-Za-z0-9+/=\s]+", value):  # base64, not a file name
        return f"{value[:80]}… ({len(value)} characters of base64: store images as files or bytes)"
    return value


# SDXL's training buckets at 1024² (width, height): ~1 megapixel each, sides multiples of 64.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))


def make_buckets(resolution):
    """SDXL's buckets scaled to `resolution`: sides rounded to multiples of 64 (of resolution/8 below 512)."""
    step = 64 if resolution >= 512 else max(8, resolution // 64 * 8)
    buckets = []
    for w, h in SDXL_BUCKETS:
        size = (max(step, round(w * resolution / 1024 / step) * step),
                max(step, round(h * resolution / 1024 / step) * step))
        if size not in buckets:
            buckets.append(size)
    return buckets


def nearest_bucket(size, buckets):
    """Index of the bucket whose aspect ratio is nearest (in log space) to the image's."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - ratio))


def merge_small_buckets(groups, buckets, batch_size):
    """A bucket with fewer images than a batch never fills one, so its images would never be trained on: they
    join the bucket nearest in aspect ratio that does fill a batch (and are cropped to its shape)."""
    counts = {b: groups.count(b) for b in set(groups)}
    full = [b for b, n in counts.items() if n >= batch_size] or [max(counts, key=counts.get)]
    moved = {b: full[nearest_bucket(buckets[b], [buckets[f] for f in full])] for b in counts if b not in full}
    if moved:
        logger.info("buckets with fewer images than a batch joined the nearest full one: %s", ", ".join(
            f"{buckets[b][0]}x{buckets[b][1]} ({counts[b]}) -> {buckets[to][0]}x{buckets[to][1]}"
            for b, to in sorted(moved.items())))
    return [moved.get(g, g) for g in groups]


def scan_images(table, show_progress=True):
    """Read every image's header: its displayed size and identity. Rows whose file can't be opened are
    returned separately (with the reason) so the run can name and skip them up front."""
    from tqdm.auto import tqdm

    sizes, idents, bad, seen = [], [], [], {}  # seen: a path listed again (kohya's repeats) is read once
    numbers = iter(table["row"] if "row" in table.column_names else range(len(table)))
    with tqdm(total=len(table), desc="scanning images", disable=not show_progress) as bar:
        for chunk in table.select_columns(["image"]).iter(batch_size=256):
            for value, row in zip(chunk["image"], numbers):
                found = seen.get(value) if isinstance(value, str) else None
                if found is None:
                    try:
                        found = read_size(value), image_identity(value)
                    except Exception as e:
                        found = None, None
                        bad.append((describe_image(value, row), first_line(e)))  # named once, however often listed
                    if isinstance(value, str):
                        seen[value] = found
                sizes.append(found[0])
                idents.append(found[1])
                bar.update(1)
    return sizes, idents, bad


def transform_image(img, target, center_crop, flip, rng, crop=None, size=None):
    """Resize to cover `target` (w, h), crop to it, maybe flip; pixels in [-1, 1] plus SDXL's size
    conditioning: the original (h, w) and the crop's top-left (top, left) as seen in the output image.
    `crop` fixes the pre-flip crop offset (a cached random crop); `size` is the image's full (w, h) when it
    was decoded smaller (decode_image's JPEG scaling): sizes and crops are those of the full image."""
    (w, h), (tw, th) = size or img.size, target
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if crop is not None:
        top, left = crop
    elif center_crop:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    # Resize only the crop's box of the source: the pixels of resizing all of it and cropping (up to Pillow's
    # rounding between its two passes), without building the whole resized image (a 2000x10 banner for a 1024²
    # bucket would be 204800x1024, a gigabyte).
    sx, sy = img.size[0] / rw, img.size[1] / rh
    img = img.resize((tw, th), Image.Resampling.LANCZOS, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - left - tw  # the crop's left edge, as seen in the flipped image
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (h, w), (top, left)


def time_ids(original_size, crop, target):
    """SDXL's add_time_ids for one sample: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop, target[1], target[0]], dtype=torch.float32)


@dataclass
class DataPlan:
    """What the loader needs besides the table: each row's target size, and the caches to read from."""
    targets: list                 # (w, h) per row
    idents: list = None           # image identities (for latent cache keys), when scanned
    text_cache: object = None     # TensorCache of prompt embeddings, or None
    latent_cache: object = None   # TensorCache of latents, or None
    text_ns: str = ""
    latent_ns: str = ""

    def fingerprint(self, captions):
        """The images (file name and size, or the stored bytes' hash) and captions, in order: what a resumed
        run's data order and pairs depend on. A folder copied elsewhere (other paths and times) keeps it."""
        h = hashlib.blake2b(digest_size=4)
        for ident, caption in zip(self.idents, captions):
            kind, _, rest = ident.partition(":")
            path, size, _ = rest.rsplit(":", 2) if kind == "file" else (rest, "", "")
            h.update(f"{os.path.basename(path)}:{size}\0{json.dumps(caption)}\0".encode())
        return f"{self.describe()}, {h.hexdigest()}"

    def describe(self):
        """"N images", and how many samples an epoch draws when images repeat (kohya's repeats)."""
        images = len(set(self.idents))
        return f"{images} images" + (f" ({len(self.idents)} samples an epoch)" if images < len(self.idents) else "")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """One training sample per row. Indexed by (row, sample_seed), so random crop, flip, caption choice and
    caption dropout are a pure function of (seed, epoch, row): identical across workers, processes, restarts.
    Reads cached latents / embeddings when the plan has them, else decodes the image.

    A row whose image fails to decode is named in the sample's `skipped` and replaced by the next row of the
    same bucket or, when all of that bucket failed, of the next bucket (every sample of a batch comes from one
    bucket, so they all move to the same one): batches keep their size, so every process still runs the same
    collectives (a rank with an empty batch would leave the others waiting in the gradient all-reduce forever),
    and no step goes by untrained. A sample comes back empty only when every image failed. A row that failed is
    not decoded again by this (worker's) copy: a bucket of many bad files would otherwise cost each sample a
    decode of every bad row before the next good one."""

    def __init__(self, table, args, plan):
        self.table, self.args, self.plan = table, args, plan
        self.failed, self.bad_files = {}, set()  # row -> how it is named in `skipped`; the paths that failed
        self.same_target, self.position = {}, []
        for i, target in enumerate(plan.targets):
            rows = self.same_target.setdefault(target, [])
            self.position.append(len(rows))
            rows.append(i)
        self.buckets = list(self.same_target.values())
        self.bucket_index = {target: n for n, target in enumerate(self.same_target)}

    def __len__(self):
        return len(self.table)

    def __getitem__(self, key):
        i, sample_seed = key
        i = int(i)
        buckets, first = self.buckets, self.bucket_index[self.plan.targets[i]]
        skipped = []
        for rows in buckets[first:] + buckets[:first]:  # i's bucket, then the others in turn
            start = self.position[i] % len(rows)
            for n in range(len(rows)):  # i (or the row at its position), then the rows after it
                j = rows[(start + n) % len(rows)]
                if j not in self.failed:
                    sample = self.load(j, random.Random(sample_seed))
                    if "caption" in sample:
                        return {**sample, "skipped": skipped}
                    self.failed[j] = sample["skipped"]
                skipped.append(self.failed[j])
        return {"skipped": skipped}

    def load(self, i, rng):
        args, plan, row = self.args, self.plan, self.table[i]
        number = row.get("row", i)  # the dataset's row, in messages
        caption = row["text"]
        if isinstance(caption, (list, tuple)):  # one of the captions, not a null or empty one among them
            caption = [c for c in caption if not blank(c)]
            caption = rng.choice(caption) if caption else ""
        caption = "" if caption is None or rng.random() < args.caption_dropout else str(caption)
        if args.shuffle_caption:
            caption = shuffled_tags(caption, args.keep_tokens, rng)
        target = plan.targets[i]
        flip = args.random_flip and rng.random() < 0.5
        sample = {"caption": caption}
        if plan.text_cache is not None:
            sample.update(plan.text_cache.get(text_key(plan.text_ns, caption)))
        if plan.latent_cache is not None:
            key = latent_key(plan.latent_ns, plan.idents[i], target, flip, args)
            if key not in plan.latent_cache:  # its file failed to decode while the cache was built
                return {"skipped": describe_image(row["image"], number)}
            sample.update(plan.latent_cache.get(key))
            return sample
        name, value = describe_image(row["image"], number), row["image"]
        file = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) and \
            value.get("bytes") is None else None  # (stored bytes are their row's own, whatever their path says)
        if file is not None and file in self.bad_files:  # failed under another row (kohya's repeats): not again
            return {"skipped": name}
        decoded = decode_image(value, cover=target, row=number)
        if decoded is None:  # unreadable or truncated: named, and replaced by another row
            self.bad_files.add(file)
            return {"skipped": name}
        img, size = decoded
        pixels, original, crop = transform_image(img, target, args.center_crop, flip, rng, size=size)
        sample.update(pixel_values=pixels, time_ids=time_ids(original, crop, target))
        return sample


def shuffled_tags(caption, keep, rng):
    """kohya's --shuffle_caption: the comma-separated tags in a new order each draw, the first `keep` in place (a
    trigger word), so that no tag is learnt as belonging to a position in the prompt."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    rest = tags[keep:]
    rng.shuffle(rest)
    return ", ".join(tags[:keep] + rest)


def collate(samples):
    """Stack a batch, naming the files that were skipped. A batch whose every sample failed (no substitute
    decoded either: every image failed) has no tensors, and the loop stops with an error."""
    good = [s for s in samples if "caption" in s]
    batch = {"skipped": [name for s in samples for name in s["skipped"]]}
    if good:
        batch["captions"] = [s["caption"] for s in good]
        for name in ("pixel_values", "latents", "time_ids", "prompt_embeds", "pooled_prompt_embeds"):
            if name in good[0]:
                batch[name] = torch.stack([s[name] for s in good])
    return batch


class BatchSampler:
    """Seeded, rank-aware, resumable batches drawn from one group (bucket) at a time. Each epoch: shuffle each
    group with (seed, epoch), cut it into full batches, shuffle the batches, deal them round-robin to the
    ranks, keep a whole number of optimizer steps per rank. `set_epoch(e, skip)` starts epoch e after `skip`
    batches without loading them."""

    def __init__(self, groups, batch_size, seed, num_replicas=1, rank=0, multiple_of=1):
        self.groups, self.batch_size, self.seed = list(groups), batch_size, seed
        self.num_replicas, self.rank, self.multiple_of = num_replicas, rank, multiple_of
        self.epoch, self.skip = 0, 0
        sizes = {}
        for g in self.groups:
            sizes[g] = sizes.get(g, 0) + 1
        total = sum(n // batch_size for n in sizes.values())
        self.length = total // num_replicas // multiple_of * multiple_of

    def __len__(self):
        return self.length

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def batches(self, epoch):
        """Every rank's batches of `epoch`, dealt: this rank's are [rank::num_replicas]."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(len(self.groups), generator=g).tolist()
        members = {}
        for i in order:  # each group's members, in shuffled order
            members.setdefault(self.groups[i], []).append(i)
        batches = [m[j:j + self.batch_size] for m in members.values()
                   for j in range(0, len(m) - self.batch_size + 1, self.batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[p] for p in perm]

    def __iter__(self):
        mine = self.batches(self.epoch)[self.rank::self.num_replicas][:len(self)]
        for batch in mine[self.skip:]:
            yield [(i, derive_seed(self.seed, "sample", self.epoch, i)) for i in batch]


def report_upscaled(table, sizes, targets, idents):
    """Name the images smaller than their training size (bucket), most enlarged first: a web thumbnail or an icon
    trains as a blur, worth a warning when enlarged more than twice. (Images, not rows: kohya's repeats list one
    file many times.)"""
    first = {ident: i for i, ident in reversed(list(enumerate(idents)))}
    factor = {i: max(tw / w, th / h) for i, ((w, h), (tw, th)) in enumerate(zip(sizes, targets))
              if (w < tw or h < th) and first[idents[i]] == i}
    if not factor:
        return
    worst = sorted(factor, key=lambda i: -factor[i])[:5]
    picked = table.select(worst)
    column, rows = picked["image"], picked["row"] if "row" in table.column_names else worst
    names = [f"{describe_image(v, r)} ({sizes[i][0]}x{sizes[i][1]}, {factor[i]:.1f}x)"
             for i, v, r in zip(worst, column, rows)]
    big = sum(f > 2 for f in factor.values())
    (logger.warning if big else logger.info)(
        "%d of %d images are smaller than their training size and are upscaled%s; the most: %s", len(factor),
        len(first), f" ({big} more than 2x: they train blurred; remove them or lower --resolution)" if big else "",
        "; ".join(names))


def plan_data(args, table, show_progress=True):
    """Drop unreadable rows (named), give every row a target size (its bucket, or the square), and the
    groups the sampler batches by. Reads only image headers: decoding happens in the loader workers."""
    start = time.perf_counter()
    sizes, idents, bad = scan_images(table, show_progress)
    if bad:
        logger.warning("skipping %d unreadable image(s): %s", len(bad),
                       "; ".join(f"{name} ({why})" for name, why in bad[:20]) + (" …" if len(bad) > 20 else ""))
    keep = [i for i, s in enumerate(sizes) if s is not None]
    if not keep:
        raise UserError(f"none of the {len(table)} images could be read (first: {bad[0][0]}: {bad[0][1]})")
    if len(keep) < len(table):
        table, sizes, idents = table.select(keep), [sizes[i] for i in keep], [idents[i] for i in keep]
    if not args.aspect_ratio_bucketing:
        targets, groups = [(args.resolution, args.resolution)] * len(sizes), [0] * len(sizes)
    else:
        buckets = make_buckets(args.resolution)
        groups = merge_small_buckets([nearest_bucket(s, buckets) for s in sizes], buckets, args.train_batch_size)
        targets = [buckets[g] for g in groups]
        histogram = ", ".join(f"{buckets[b][0]}x{buckets[b][1]}: {groups.count(b)}" for b in sorted(set(groups)))
        logger.info("aspect-ratio buckets (w x h: images): %s", histogram)
    report_upscaled(table, sizes, targets, idents)
    logger.info("scanned %d images in %.1f s", len(table), time.perf_counter() - start)
    return table, DataPlan(targets=targets, idents=idents), groups


# ----------------------------------------------------------------------------------------------------------------
# 4. conditioning
# ----------------------------------------------------------------------------------------------------------------

def encode_prompt(text_encoders, tokenizers, captions, device=None):
    """SDXL's text conditioning: penultimate hidden states of both encoders, concatenated on the feature axis
    ([B, 77, 768 + 1280] for SDXL), and the pooled, projected output of the second encoder ([B, 1280])."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        target = device or encoder.device
        if target.type == "cuda":  # a pageable copy blocks until the GPU's queue drains; a pinned one does not
            ids = ids.pin_memory()
        ids = ids.to(target, non_blocking=True)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's text_embeds (CLIPTextModelWithProjection)
    return torch.cat(hidden, dim=-1), pooled


def encode_latents(vae, pixels, dtype):
    """VAE latents, scaled for the UNet. The posterior's mean (its mode) rather than a sample: the SDXL VAE's
    posterior std is tiny, and the mean is what a disk cache can store, so cached and uncached runs agree."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return latents.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# 5. cache — text embeddings (whenever the text encoders are frozen) and, with --cache_latents, VAE latents
# ----------------------------------------------------------------------------------------------------------------
# Entries live in safetensors shards under --data_cache_dir, keyed by a hash of everything that determines them
# (model, revision, variant, dtype, caption / image file, target size, crop, flip). A second run with the same
# settings finds every key and computes nothing; a changed setting computes only the entries it changes.
# Old entries are never deleted by the trainer: delete the folder to reclaim the space.

def cache_key(*parts):
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()


def text_key(namespace, caption):
    return cache_key(namespace, caption)


def latent_key(namespace, ident, target, flip, args):
    """With a random crop the crop is drawn once per image (seeded) and cached with its coordinates: the run
    then sees one crop per image instead of a new one each epoch, the price of never re-encoding."""
    crop = "center" if args.center_crop else ("random", args.seed)
    return cache_key(namespace, ident, target, crop, bool(flip))


class TensorCache:
    """key -> {name: tensor}, stored as "<key>.<name>" in safetensors shards. Shards are written to a temp
    name and renamed when complete, so an interrupted build loses only the shard in progress."""

    def __init__(self, folder, kind):
        self.folder, self.kind, self.index = folder, kind, {}
        os.makedirs(folder, exist_ok=True)
        self.refresh()

    def refresh(self):
        from safetensors import safe_open

        for name in sorted(os.listdir(self.folder)):
            if name.startswith(self.kind + "-") and name.endswith(".safetensors.tmp"):
                path = os.path.join(self.folder, name)
                with suppress(OSError):  # a shard a killed build left half-written: an hour old, it is abandoned
                    if time.time() - os.path.getmtime(path) > 3600:  # (a fresh one may be another run's, writing)
                        os.remove(path)
            if name.startswith(self.kind + "-") and name.endswith(".safetensors"):
                path = os.path.join(self.folder, name)
                try:
                    with safe_open(path, "pt") as f:
                        keys = list(f.keys())
                except Exception as e:  # damaged (a full disk, a copy cut short): computed again, not trusted
                    logger.warning("cache shard %s is damaged (%s): removed, its entries are computed again", path,
                                   first_line(e))
                    with suppress(OSError):  # another process may have removed it first
                        os.remove(path)
                    continue
                for k in keys:
                    self.index[k.split(".", 1)[0]] = path

    def __contains__(self, key):
        return key in self.index

    def get(self, key):
        from safetensors import safe_open

        with safe_open(self.index[key], "pt") as f:
            return {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(key + ".")}

    def write(self, entries, tag):
        from safetensors.torch import save_file

        flat = {f"{key}.{name}": t.detach().cpu().contiguous() for key, d in entries.items() for name, t in d.items()}
        path = os.path.join(self.folder, f"{self.kind}-{tag}-{os.getpid()}-{time.time_ns()}.safetensors")
        save_file(flat, path + ".tmp")
        os.replace(path + ".tmp", path)
        for key in entries:
            self.index[key] = path

    def size_bytes(self):
        return sum(os.path.getsize(p) for p in set(self.index.values()))


def caches_text(args):
    """Text embeddings are cached whenever the text encoders are frozen (off with --train_text_encoder) and each
    caption is one text (off with --shuffle_caption: every draw is another)."""
    return not (args.no_text_cache or args.train_text_encoder or args.shuffle_caption)


def cache_namespaces(args, weight_dtype):
    """What the encoders' outputs depend on: model id, revision, variant, dtype, and for local folders the
    weight files' sizes and times (a model rewritten in place must not reuse old entries)."""
    base, vae = args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    config = args.single_file_config
    model = (base, args.revision, args.variant, str(weight_dtype), *([config] if config else []))
    if os.path.isfile(base):  # the weights in one file, the configs and tokenizers (they shape the outputs too) apart
        text_files, vae_files = [base], [vae or base]
        if config:
            text_files += [os.path.join(config, sub) for sub in ("text_encoder", "text_encoder_2", "tokenizer",
                                                                 "tokenizer_2")]
            vae_files.append(os.path.join(config, "vae"))
    else:
        text_files = [os.path.join(base, sub) for sub in ("text_encoder", "text_encoder_2")]
        vae_files = [vae] if vae else [os.path.join(base, "vae")]
        if vae and os.path.isfile(vae):  # a VAE file is read with the base model's VAE config
            vae_files.append(os.path.join(base, "vae"))
    return (cache_key("text", *model, files_fingerprint(text_files)),
            # "sRGB": latents cached before colour profiles were applied (to_srgb) are not reused
            cache_key("latents", *model, vae or "vae", files_fingerprint(vae_files), "sRGB"))


def files_fingerprint(folders):
    """(name, size, mtime) of the files in local folders, or of local files; nothing for Hub ids (their revision
    stands in)."""
    found = []
    for folder in folders:
        if os.path.isfile(folder):
            st = os.stat(folder)
            found.append((folder, st.st_size, st.st_mtime_ns))
        elif os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                st = os.stat(os.path.join(folder, name))
                found.append((folder, name, st.st_size, st.st_mtime_ns))
    return found


def build_text_cache(args, m, table, cache, namespace, accelerator, chunk=64):
    """Encode every distinct caption once ("" included, for dropout and empty captions), split over ranks."""
    captions = {""}
    for c in table["text"]:
        captions.update(str(x) for x in (c if isinstance(c, (list, tuple)) else [c]) if x is not None)
    todo = sorted(c for c in captions if text_key(namespace, c) not in cache)
    tokenizer = m.tokenizers[0]
    long = sum(len(ids) > tokenizer.model_max_length for ids in tokenizer(todo).input_ids) if todo else 0
    if long:
        logger.info("%d of %d captions are longer than the text encoders' %d tokens and are cut there (as in "
                    "diffusers and kohya)", long, len(todo), tokenizer.model_max_length)
    mine = todo[accelerator.process_index::accelerator.num_processes]
    with torch.no_grad():
        for j in tqdm_range(len(mine), chunk, "caching text embeddings", accelerator):
            part = mine[j:j + chunk]
            embeds, pooled = encode_prompt(m.text_encoders, m.tokenizers, part)
            cache.write({text_key(namespace, c): {"prompt_embeds": e, "pooled_prompt_embeds": p}
                         for c, e, p in zip(part, embeds, pooled)}, f"r{accelerator.process_index}")
    return len(todo)


def build_latent_cache(args, m, table, plan, cache, accelerator):
    """VAE-encode every (image, flip) variant a run can draw, split over ranks, in same-size batches."""
    flips = (False, True) if args.random_flip else (False,)
    entries = {}  # cache key -> (row, flip), one job per entry: kohya's repeats list an image several times
    for i in range(len(table)):
        for f in flips:
            entries.setdefault(latent_key(plan.latent_ns, plan.idents[i], plan.targets[i], f, args), (i, f))
    rank, world = accelerator.process_index, accelerator.num_processes
    mine, mine_keys = list(entries.values())[rank::world], list(entries)[rank::world]
    by_size = {}  # positions in `mine`, grouped by target size so each VAE call gets one shape
    for n, (i, _) in enumerate(mine):
        by_size.setdefault(plan.targets[i], []).append(n)
    batches = [ns[k:k + args.cache_batch_size] for ns in by_size.values()
               for k in range(0, len(ns), args.cache_batch_size)]
    # Batches are cut from every entry, cached or not, and those already cached skipped: a build killed part way
    # resumes with the batches it would have had (a VAE batch of another size rounds differently), on any rank.
    batches = [b for b in batches if not all(mine_keys[n] in cache for n in b)]
    workers = loader_workers(args, accelerator)
    loader = torch.utils.data.DataLoader(LatentJobs(table, args, plan, mine), batch_sampler=batches,
                                         num_workers=workers, persistent_workers=workers > 0, collate_fn=list,
                                         worker_init_fn=leave_stop_requests_to_the_trainer)
    from tqdm.auto import tqdm
    written = 0  # entries, not jobs: a file that fails to decode writes none (and is named)
    with torch.no_grad(), workers_stopped(loader):
        for batch in tqdm(loader, desc="caching latents", disable=not accelerator.is_local_main_process):
            batch = [s for s in batch if s is not None]
            if not batch:
                continue
            pixels = torch.stack([s["pixel_values"] for s in batch]).to(accelerator.device)
            latents = encode_latents(m.vae, pixels, m.weight_dtype)
            new = {s["key"]: {"latents": lat, "time_ids": s["time_ids"]} for s, lat in zip(batch, latents)
                   if s["key"] not in cache}  # (a batch partly cached by another run is encoded whole)
            written += len(new)
            if new:
                cache.write(new, f"r{rank}")
    return int(accelerator.reduce(torch.tensor([written], device=accelerator.device), "sum").item())


class LatentJobs(torch.utils.data.Dataset):
    """(row, flip) -> pixels, time_ids and cache key, with the row's fixed crop (center, or seeded random)."""

    def __init__(self, table, args, plan, jobs):
        self.table, self.args, self.plan, self.jobs = table, args, plan, jobs

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, n):
        i, flip = self.jobs[n]
        row, target = self.table[i], self.plan.targets[i]
        value = row["image"]
        decoded = decode_image(value, cover=target, row=row.get("row", i))
        if decoded is None:
            return None
        img, size = decoded
        # Seeded by the image, as its cache key is: the same crop for both flips and whatever row it sits in.
        rng = random.Random(derive_seed(self.args.seed, "crop", self.plan.idents[i]))
        pixels, original, crop = transform_image(img, target, self.args.center_crop, flip, rng, size=size)
        return {"pixel_values": pixels, "time_ids": time_ids(original, crop, target),
                "key": latent_key(self.plan.latent_ns, self.plan.idents[i], target, flip, self.args)}


def tqdm_range(n, step, desc, accelerator):
    from tqdm.auto import tqdm
    return tqdm(range(0, n, step), desc=desc, disable=not accelerator.is_local_main_process)


def cache_folder(args):
    """Where the text and latent caches live: --data_cache_dir, else output_dir/cache."""
    return args.data_cache_dir or os.path.join(args.output_dir, "cache")


def build_caches(args, m, table, plan, accelerator):
    """Fill the caches this run uses, then move the frozen models it no longer needs off the accelerator."""
    text_ns, latent_ns = cache_namespaces(args, m.weight_dtype)
    plan.text_ns, plan.latent_ns = text_ns, latent_ns
    folder = cache_folder(args)
    start = time.perf_counter()
    plan.text_cache = TensorCache(folder, "text") if caches_text(args) else None
    plan.latent_cache = TensorCache(folder, "latents") if args.cache_latents else None
    accelerator.wait_for_everyone()  # every rank sees the same cached keys, so they split the same to-do list
    new_text = new_latents = 0
    if plan.text_cache is not None:
        new_text = build_text_cache(args, m, table, plan.text_cache, text_ns, accelerator)
    if plan.latent_cache is not None:
        new_latents = build_latent_cache(args, m, table, plan, plan.latent_cache, accelerator)
    accelerator.wait_for_everyone()
    for cache in (plan.text_cache, plan.latent_cache):
        if cache is not None:
            cache.refresh()  # pick up the other ranks' shards
    size = sum(c.size_bytes() for c in (plan.text_cache, plan.latent_cache) if c is not None)
    logger.info("cache %s: %d new text entries, %d new latent entries in %.1f s; %.1f MB on disk", folder,
                new_text, new_latents, time.perf_counter() - start, size / 1e6)
    if not args.validation_prompt:  # validation needs the encoders; otherwise free the accelerator's memory
        for te in m.text_encoders if plan.text_cache is not None else []:
            te.to("cpu")
        if args.cache_latents:
            m.vae.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# 6. step
# ----------------------------------------------------------------------------------------------------------------

def training_step(batch, m, args, generator, new_step=True):
    """One micro-batch: encode (unless cached), noise, predict, weighted loss.

    `batch` holds either pixel_values or cached `latents` (scaled, in weight_dtype), either captions or cached
    `prompt_embeds` + `pooled_prompt_embeds`, and `time_ids`. `new_step`: the first micro-batch of an optimizer
    step. Returns (loss, per-sample stats, detached)."""
    device = generator.device
    if uses_cuda_graphs(args) and new_step:
        # CUDA graphs reuse their output memory once a new step begins. Marked by hand, a step is one generation:
        # left to torch, each frozen (no-grad) block call began one and overwrote a skip connection still in use.
        # Not at later micro-batches, whose backward adds to the gradients the earlier ones left in that memory.
        torch.compiler.cudagraph_mark_step_begin()
    if "latents" in batch:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        with torch.no_grad():
            latents = encode_latents(m.vae, batch["pixel_values"].to(device, non_blocking=True), m.weight_dtype)
    if "prompt_embeds" in batch:
        prompt_embeds = batch["prompt_embeds"].to(device, non_blocking=True)
        pooled = batch["pooled_prompt_embeds"].to(device, non_blocking=True)
    else:  # with gradients only when the text encoders train
        with nullcontext() if args.train_text_encoder else torch.no_grad():
            prompt_embeds, pooled = encode_prompt(m.text_encoders, m.tokenizers, batch["captions"], device)
    latents = latents.float()  # noise, targets and the loss in fp32; autocast casts the UNet's inputs
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=generator,
                                                        device=device, dtype=latents.dtype)
    sched = m.noise_scheduler
    t_max = args.max_timestep or sched.config.num_train_timesteps
    timesteps = torch.randint(args.min_timestep, t_max, (bsz,), generator=generator, device=device)
    # Input perturbation (arXiv:2301.11706): noise the input with slightly different noise than the target's.
    new_noise = noise
    if args.input_perturbation:
        new_noise = noise + args.input_perturbation * torch.randn(latents.shape, generator=generator, device=device)
    noisy = sched.add_noise(latents, new_noise, timesteps)
    prediction_type = sched.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(prediction_type)
    if target is None:
        target = sched.get_velocity(latents, noise, timesteps)
    # time_ids stay fp32: bf16 would round sizes above 1024 to multiples of 8 (the UNet embeds them in fp32).
    # non_blocking from the loader's pinned memory: a blocking copy would wait for the previous step to finish.
    added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, non_blocking=True).float()}
    pred = m.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
    per_sample = debias_loss.diffusion_loss(pred, target, timesteps, sched.alphas_cumprod, args.loss_weighting,
                                            prediction_type, args.snr_gamma, reduction="none")
    per_sample = per_sample * m.loss_scale
    stats = {"loss": per_sample.detach(), "mse": debias_loss.per_sample_mse(pred.detach(), target),
             "timesteps": timesteps}
    return per_sample.mean(), stats


# ----------------------------------------------------------------------------------------------------------------
# 7. checkpoints
# ----------------------------------------------------------------------------------------------------------------

# What a checkpoint's weights and optimizer state are shaped by: resuming with another value cannot work.
RUN_SHAPE = ("finetune", "rank", "lora_alpha", "lora_target_modules", "use_dora", "train_text_encoder", "optimizer",
             "use_ema")
# What a resume may change but should say it changed: the schedule, the data and its order, and the objective.
RUN_SETTINGS = ("lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "max_train_steps", "num_train_epochs",
                "train_batch_size", "gradient_accumulation_steps", "dataset", "dataset_config_name", "dataset_split",
                "train_data_dir", "max_train_samples",
                "resolution",
                "aspect_ratio_bucketing", "seed", "pretrained_model_name_or_path", "single_file_config",
                "loss_weighting", "snr_gamma",
                "prediction_type", "min_timestep", "max_timestep", "noise_offset", "input_perturbation",
                "caption_dropout", "shuffle_caption", "keep_tokens", "caption_extension", "lora_dropout",
                "center_crop", "random_flip", "cache_latents",
                "normalize_loss_weights", "pretrained_vae_model_name_or_path", "revision", "variant",
                "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "max_grad_norm")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # marks a complete checkpoint written by this trainer


def list_checkpoints(output_dir):
    """Complete checkpoints of this trainer in output_dir, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.exists(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def register_checkpoint_hooks(accelerator, args, m):
    """Checkpoints hold only what trains: the LoRA files (loadable as they are) or the UNet (+ its EMA)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            unet, *text_encoders = [accelerator.unwrap_model(x) for x in models]
            step = int(output_dir.rsplit("-", 1)[1])  # save_checkpoint's .tmp-checkpoint-N
            export_trained(args, output_dir, unet, text_encoders, m.ema, step=step,
                           prediction_type=m.noise_scheduler.config.prediction_type)
        weights.clear()  # accelerate would otherwise pickle every weight again

    def load_hook(models, input_dir):
        unet, *text_encoders = [accelerator.unwrap_model(x) for x in models]
        models.clear()
        load_trained(args, input_dir, unet, text_encoders, m.ema)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def lora_layers(model):
    """The adapter's weights as peft names them (`….lora_A.weight`), which diffusers loads for every layer
    type. (diffusers' convert_state_dict_to_diffusers renames only the attention projections: a LoRA on convs
    too became a file of two styles, whose attention half load_lora_weights silently dropped.) The first CLIP
    encoder's keys keep `text_model.`: transformers 5 flattened that class, and older stacks need it.
    A text encoder's DoRA magnitudes are named as transformers 5's load_adapter (which diffusers loads text
    encoder LoRAs with) reads them, `….lora_magnitude_vector.weight`; under peft's name it re-initialised them
    without a word. load_trained takes either."""
    import transformers
    from peft.utils import get_peft_model_state_dict

    prefix = "text_model." if flattened_clip(model) else ""
    suffix = ".weight" if (isinstance(model, transformers.PreTrainedModel)
                           and int(transformers.__version__.split(".")[0]) >= 5) else ""
    # contiguous: safetensors refuses the channels-last conv LoRA weights of --channels_last
    return {prefix + k + (suffix if k.endswith(".lora_magnitude_vector") else ""): v.contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def clip_state(model):
    """A CLIP text encoder's weights under transformers' long-standing names (`text_model.…`), whichever version
    built it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in model.state_dict().items()}


def flattened_clip(model):
    """transformers 5's CLIPTextModel, which lost the `text_model.` level of its module names."""
    return type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")


# What a LoRA file's metadata keeps of peft's config: what the loaded adapter computes with, in fields every
# peft since 0.9 knows. diffusers' loader passes the metadata to LoraConfig(**...) as it is, so a field newer than
# the reader's peft (peft 0.21 writes a dozen) makes the file unloadable there ("LoraConfig class could not be
# instantiated", peft 0.17). Initialisation, task type and version fields matter only to training.
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
                  "fan_in_fan_out", "rank_pattern", "alpha_pattern")


def adapter_config(model):
    """peft's config of the trained adapter, as a LoRA file's metadata records it, with dropout off: that is a
    training setting, and diffusers' loader would keep it on while generating (noisy, unrepeatable images)."""
    config = model.peft_config["default"].to_dict()
    return {**{k: config[k] for k in ADAPTER_FIELDS if k in config}, "lora_dropout": 0.0}


def export_trained(args, folder, unet, text_encoders=(), ema=None, step=None, prediction_type=None):
    """LoRA: diffusers' pytorch_lora_weights.safetensors plus the kohya/WebUI/ComfyUI single file (named for
    the checkpoint's `step`, if any). Full: unet/ (and unet_ema/ with --use_ema)."""
    if args.finetune == "lora":
        from diffusers import StableDiffusionXLPipeline

        # The adapter configs go into the file's metadata: without them diffusers loads with alpha = rank, a
        # wrong scale whenever --lora_alpha differs from --rank.
        layers = {"unet_lora_layers": lora_layers(unet), "unet_lora_adapter_metadata": adapter_config(unet)}
        for name, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
            layers[f"{name}_lora_layers"], layers[f"{name}_lora_adapter_metadata"] = lora_layers(te), adapter_config(te)
        save = StableDiffusionXLPipeline.save_lora_weights
        if "unet_lora_adapter_metadata" not in inspect.signature(save).parameters:  # diffusers < 0.34
            layers = {k: v for k, v in layers.items() if not k.endswith("_metadata")}
            if args.lora_alpha != args.rank:
                logger.warning("this diffusers cannot store --lora_alpha in pytorch_lora_weights.safetensors, so it "
                               "loads at the wrong scale; use %s, or upgrade diffusers", kohya_name(args.output_dir))
        save(folder, safe_serialization=True, **layers)
        kohya = os.path.join(folder, kohya_name(args.output_dir, step))
        if not write_kohya_lora(args, kohya, unet, text_encoders, prediction_type) and not args.use_dora:
            logger.warning("no kohya file written: the adapter has weights kohya's format cannot hold")
    else:
        unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
        if ema is not None:
            ema.save_pretrained(os.path.join(folder, "unet_ema"))


def kohya_name(output_dir, step=None):
    """`<output_dir name>.safetensors`; a checkpoint's `<name>-step00000500.safetensors`, as kohya names them, so
    that several copied into one loras/ folder (ComfyUI, A1111) keep apart. An output folder named like
    diffusers' file gets `_kohya` added: the kohya file would overwrite the diffusers one."""
    name = run_name(output_dir)
    name += "_kohya" if name == "pytorch_lora_weights" else ""
    return name + (f"-step{step:08d}" if step else "") + ".safetensors"


def run_name(output_dir):
    """The output folder's name: the kohya and single files', the model card's title, the Hub repository's."""
    return os.path.basename(os.path.abspath(output_dir))


def write_kohya_lora(args, path, unet, text_encoders, prediction_type=None):
    """One file in kohya's LoRA format for SDXL, which kohya's sd-scripts, A1111/Forge, ComfyUI and diffusers'
    load_lora_weights all read: `lora_unet_<module path with _>.lora_down.weight` (= peft's lora_A),
    `.lora_up.weight` (lora_B) and `.alpha`, with the UNet's paths in the original (SGM) layout kohya trains
    SDXL on (`input_blocks_4_1_…`, see sgm_path); text encoders as `lora_te1_text_model_…` / `lora_te2_…`.
    DoRA has no kohya form: then no file (the model card says so). The metadata is what kohya's tools and the
    WebUIs read: network module, rank and alpha (conv layers' too), base model, v-parameterisation."""
    from safetensors.torch import save_file

    out, convs = {}, False
    for prefix, model in zip(("lora_unet", "lora_te1", "lora_te2"), (unet, *text_encoders)):
        for key, value in lora_layers(model).items():
            module, _, kind = key.rpartition(".lora_")  # "down_blocks.0...to_q", "A.weight"
            if kind not in ("A.weight", "B.weight"):
                return False
            if prefix == "lora_unet":
                module = sgm_path(module, unet.config)
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(args.lora_alpha))
            convs |= value.dim() == 4 and value.shape[-1] > 1  # kohya's "conv" LoRA: 3x3 kernels
    prediction = prediction_type or args.prediction_type or "epsilon"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.lora_alpha), "ss_base_model_version": "sdxl_base_v1-0",
                "ss_v_parameterization": str(prediction == "v_prediction"), "ss_output_name": run_name(args.output_dir),
                "ss_sd_model_name": os.path.basename(args.pretrained_model_name_or_path.rstrip("/\\")),
                **modelspec(args, "stable-diffusion-xl-v1-base/lora", prediction)}
    if convs:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(args.rank), "conv_alpha": str(args.lora_alpha)})
    save_file(out, path, metadata=metadata)
    return True


def modelspec(args, architecture, prediction):
    """Stability's model-spec metadata, by which ComfyUI, Forge and SwarmUI tell what a file is (architecture
    `stable-diffusion-xl-v1-base`, `/lora` for a LoRA) and how to sample it."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": run_name(args.output_dir),
            "modelspec.resolution": f"{args.resolution}x{args.resolution}",
            "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction, prediction)}


RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def sgm_path(path, config):
    """A diffusers UNet module path in the original (SGM/LDM) layout. Each level of the down path is
    `layers_per_block` resnet(+attention) blocks then a downsampler, numbered on in `input_blocks` after conv_in;
    each up level `layers_per_block + 1` blocks, its upsampler inside the last; the middle is resnet,
    attention, resnet. Inside a block, attention layers keep their names and resnets take SGM's."""
    for name, sgm in TOP_SGM.items():
        if path == name or path.startswith(name + "."):
            return sgm + path[len(name):]
    per_level = config.layers_per_block + 1
    parts = path.split(".")
    if parts[0] == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle_block.0, .1, .2
        kind, n, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{2 * n if kind == 'resnets' else 1}"
    else:
        level, kind, n, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        inner = 0 if kind == "resnets" else 1
        if parts[0] == "down_blocks" and kind == "downsamplers":  # downsamplers.0.conv -> input_blocks.N.0.op
            block, rest = f"input_blocks.{(level + 1) * per_level}.0", ["op", *rest[1:]]
        elif parts[0] == "down_blocks":
            block = f"input_blocks.{1 + level * per_level + n}.{inner}"
        elif kind == "upsamplers":  # upsamplers.0.conv -> output_blocks.N.(2 after an attention, else 1).conv
            after_attention = "CrossAttn" in config.up_block_types[level]
            block = f"output_blocks.{(level + 1) * per_level - 1}.{2 if after_attention else 1}"
        else:
            block = f"output_blocks.{level * per_level + n}.{inner}"
    if kind == "resnets" and rest:
        rest = [*RESNET_SGM.get(rest[0], rest[0]).split("."), *rest[1:]]
    return ".".join([block, *rest])


VAE_LDM = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q",
           "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "downsamplers.0": "downsample", "upsamplers.0": "upsample"}
OPENCLIP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm": "ln_final", "text_model.encoder.layers": "transformer.resblocks",
            "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def sdxl_checkpoint(pipe, dtype):
    """The whole model as one state dict in the layout of stabilityai's sd_xl_base_1.0.safetensors, which
    A1111/Forge, ComfyUI's Load Checkpoint, kohya's scripts and diffusers' from_single_file read: the UNet under
    model.diffusion_model (sgm_path), the VAE under first_stage_model (LDM names; attention as 1x1 convs), CLIP-L
    under conditioner.embedders.0.transformer (transformers' names), OpenCLIP bigG under
    conditioner.embedders.1.model (q/k/v in one in_proj, the projection as a matrix applied on the right)."""
    unet, vae = pipe.unet, pipe.vae
    state = {f"model.diffusion_model.{sgm_path(k.rsplit('.', 1)[0], unet.config)}.{k.rsplit('.', 1)[1]}": v
             for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda g: f"mid.block_{int(g[1]) + 1}", k)
        k = re.sub(r"up_blocks\.(\d+)", lambda g: f"up.{levels - 1 - int(g[1])}", k)  # LDM counts up from the bottom
        k = re.sub(r"down_blocks\.(\d+)", r"down.\1", k).replace("mid_block.attentions.0", "mid.attn_1")
        k = k.replace("resnets.", "block.")
        for name, ldm in VAE_LDM.items():
            k = re.sub(rf"(^|\.){re.escape(name)}\.", rf"\g<1>{ldm}.", k)
        state["first_stage_model." + k] = v[..., None, None] if ".attn_1." in k and v.ndim == 2 else v
    clip_l, big_g = clip_state(pipe.text_encoder), clip_state(pipe.text_encoder_2)
    state.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()})
    for k, v in big_g.items():
        if k == "text_projection.weight":
            k, v = "text_projection", v.t()
        elif "self_attn.q_proj" in k:  # q, k, v -> in_proj (their k_ and v_ entries are taken here)
            k, v = k.replace("self_attn.q_proj.", "attn.in_proj_"), torch.cat(
                [big_g[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif "self_attn.k_proj" in k or "self_attn.v_proj" in k:
            continue
        for name, ldm in OPENCLIP.items():
            k = k.replace(name, ldm)
        state["conditioner.embedders.1.model." + k] = v
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    # How ComfyUI tells a v-prediction or zero-terminal-SNR checkpoint (the WebUIs: their own settings).
    if pipe.scheduler.config.prediction_type == "v_prediction":
        state["v_pred"] = torch.tensor([], dtype=dtype)
    if pipe.scheduler.config.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([], dtype=dtype)
    return state


def load_trained(args, folder, unet, text_encoders=(), ema=None):
    if args.finetune == "lora":
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

        state, _ = StableDiffusionXLPipeline.lora_state_dict(folder, weight_name="pytorch_lora_weights.safetensors")
        parts = {"unet.": (unet, convert_unet_state_dict_to_peft)}
        for prefix, te in zip(("text_encoder.", "text_encoder_2."), text_encoders):
            parts[prefix] = (te, convert_state_dict_to_peft)
        for prefix, (model, convert) in parts.items():
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # Checkpoints of earlier versions have diffusers' names for attention layers (peft's for the rest);
            # the UNet's renaming leaves peft names alone, the text encoders' refuses them.
            if prefix == "unet." or not any(".lora_A." in k for k in sub):
                sub = convert(sub)
            if flattened_clip(model):  # lora_layers' prefix, taken off again
                sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
            # peft's name for DoRA magnitudes (lora_layers); peft would skip the other without a word
            sub = {k.removesuffix(".weight") if k.endswith(".lora_magnitude_vector.weight") else k: v
                   for k, v in sub.items()}
            load_adapter_state(model, sub, f"checkpoint {folder} ({prefix[:-1]})")
    else:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict())
        if ema is not None:
            with warnings.catch_warnings():  # diffusers' own EMAModel.from_pretrained passes a path to from_config
                warnings.filterwarnings("ignore", "It is deprecated to pass a pretrained model name", FutureWarning)
                loaded = EMAModel.from_pretrained(os.path.join(folder, "unet_ema"), model_cls=UNet2DConditionModel)
            ema.load_state_dict(loaded.state_dict())
            ema.to(next(unet.parameters()).device)


def load_adapter_state(model, state, what):
    """Put a peft-named LoRA state (`<module>.lora_A.weight`, …) into `model`'s adapter, and check that every
    tensor landed: peft skips a key it cannot place without a word."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    try:
        set_peft_model_state_dict(model, state, adapter_name="default")
    except RuntimeError as e:  # a tensor of another shape than its layer's: torch names it on the second line
        line = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), first_line(e))
        raise UserError(f"{what} does not fit this model: {line}") from None
    now = get_peft_model_state_dict(model)
    landed = now.keys() == state.keys() and all(torch.equal(now[k], v.to(now[k])) for k, v in state.items())
    if not state or not landed:
        raise UserError(f"{what} does not match this run's LoRA (rank, targets or --train_text_encoder differ)")


DAMAGED = "move that checkpoint folder aside; then --resume_from_checkpoint latest continues from the one before it"


def read_state(path):
    """A checkpoint's trainer_state.json, or a UserError naming it."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {os.path.join(path, STATE_FILE)} ({first_line(e)}): {DAMAGED}") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or "lr_scheduler" not in state:
        raise UserError(f"cannot read {os.path.join(path, STATE_FILE)} (no global_step or lr_scheduler): {DAMAGED}")
    return state


def run_settings(args, accelerator):
    """RUN_SETTINGS' values, the number of processes, and what the data is (data_fingerprint)."""
    unused = (("adam_beta1", "adam_beta2", "adam_epsilon") if args.optimizer == "adafactor" else ()) + \
        (("lr_num_cycles",) if args.lr_scheduler != "cosine_with_restarts" else ()) + \
        (("lr_power",) if args.lr_scheduler != "polynomial" else ())  # (adafactor: its own betas)
    return {**{k: getattr(args, k) for k in RUN_SETTINGS if k not in unused}, "processes": accelerator.num_processes,
            "mixed precision": accelerator.mixed_precision, "data": getattr(args, "data_fingerprint", None)}


def save_checkpoint(accelerator, args, global_step, epoch, lr_scheduler):
    """Write to a temporary folder, then rename: a kill at any moment leaves checkpoint-N complete or absent.
    The LR schedule's state goes into trainer_state.json (plain JSON): a pickled scheduler, as accelerate would
    write it, is loaded with pickle's code execution."""
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{global_step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every rank writes its RNG state; main writes weights/optimizer
    accelerator.wait_for_everyone()  # every rank has finished writing before the folder becomes a checkpoint
    if accelerator.is_main_process:
        readable_as_umask_says(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"global_step": global_step, "epoch": epoch, "lr_scheduler": lr_scheduler.state_dict(),
                       "run": {k: getattr(args, k) for k in RUN_SHAPE}, "learning_rate": args.learning_rate,
                       "settings": run_settings(args, accelerator)}, f)
        replaced = None
        if os.path.exists(os.path.join(final, STATE_FILE)):  # ours: a resumed run saving the same step again
            # Set aside by a rename and deleted once the new one is in: a kill in between leaves it to restore
            # (tidy_output_dir), where deleting it first would have left no checkpoint of this step.
            replaced = os.path.join(args.output_dir, f".old-checkpoint-{global_step}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        elif os.path.exists(final):  # someone else's folder of that name: keep it, out of the way
            names = (f"{final}.orig{n or ''}" for n in itertools.count())  # .orig, .orig1, .orig2, ...
            aside = next(name for name in names if not os.path.exists(name))
            logger.warning("%s was not written by this trainer; moved to %s", final, aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        if replaced:
            shutil.rmtree(replaced)
        prune_checkpoints(args)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def prune_checkpoints(args):
    """Keep the newest --checkpoints_total_limit checkpoints (only complete ones of this trainer count or go)."""
    if args.checkpoints_total_limit:
        for step, old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
            remove_checkpoint(args.output_dir, step, old)


def remove_checkpoint(output_dir, step, path):
    """Renamed, then deleted: killed mid-delete, a half-deleted checkpoint-N would still look complete (its
    trainer_state.json last to go); the .tmp- name is tidy_output_dir's to finish."""
    gone = os.path.join(output_dir, f".tmp-checkpoint-removed-{step}")
    os.replace(path, gone)
    shutil.rmtree(gone)


def checkpoint_to_resume(args):
    """The checkpoint folder --resume_from_checkpoint names (`latest`: the newest complete one), or None."""
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    found = list_checkpoints(args.output_dir)
    return found[-1][1] if found else None


def resume(accelerator, args, optimizer, lr_scheduler):
    """Load the checkpoint named by --resume_from_checkpoint; returns the global step it was saved at."""
    path = checkpoint_to_resume(args)
    if path is None:
        logger.info("no checkpoint in %s: starting a new run", args.output_dir)
        return 0
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise UserError(f"{path} is not a complete checkpoint of this trainer (no {STATE_FILE})")
    state = read_state(path)
    changed = [f"--{k} {state['run'][k]!r} -> {getattr(args, k)!r}" for k in RUN_SHAPE
               if k in state.get("run", {}) and state["run"][k] != getattr(args, k)]
    if changed:
        raise UserError(f"{path} was trained with other settings ({'; '.join(changed)}): resume with the "
                        "checkpoint's, or start afresh with --overwrite_output_dir or another --output_dir")
    # The optimizer's state brings back its hyperparameters too: the flags of this command win (named below).
    fresh = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in optimizer.param_groups]
    try:
        accelerator.load_state(path)
        for group, values in zip(optimizer.param_groups, fresh):
            group.update(values)
    except UserError:
        raise
    except Exception as e:  # a missing or damaged file, or a checkpoint of an older trainer version
        raise UserError(f"cannot resume from {path} ({first_line(e)}): {DAMAGED}") from None
    was = state.get("settings", {})
    if accelerator.process_index < was.get("processes", accelerator.num_processes):  # (a new rank has no state)
        check_random_state(path, accelerator.process_index)
    step = state["global_step"]
    restore_schedule(lr_scheduler, state["lr_scheduler"])
    if state.get("learning_rate", args.learning_rate) != args.learning_rate:
        logger.warning("--learning_rate %g is ignored: a resumed run keeps its checkpoint's schedule (from %g)",
                       args.learning_rate, state["learning_rate"])
        args.learning_rate = state["learning_rate"]  # what train_config.json and the model card then record
    now = run_settings(args, accelerator)
    changed = [f"{'--' * (k in RUN_SETTINGS)}{k} {was[k]!r} -> {now[k]!r}"  # (processes, data: no flags)
               for k in now if k in was and was[k] != now[k]]
    per_step = ("train_batch_size", "gradient_accumulation_steps", "processes")  # samples an optimizer step takes
    before, after = (math.prod(s.get(k, 0) for k in per_step) for s in (was, now))
    if before and before != after and accelerator.is_main_process:  # the epoch's position is counted in steps
        logger.warning("an optimizer step now takes %d samples instead of %d: the position in the data is counted "
                       "in steps, so the rest of this epoch may skip or repeat some samples of the interrupted run's; "
                       "the epochs after it are whole", after, before)
    if changed and accelerator.is_main_process:
        logger.warning("resuming with other settings than %s was trained with (%s): from step %d the run follows "
                       "the new ones, not the original run's", path, "; ".join(changed), step)
    if accelerator.is_main_process:  # rows a killed run logged after this checkpoint will be logged again
        truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step)
    logger.info("resumed from %s at step %d", path, step)
    return step


def check_random_state(path, rank):
    """accelerate skips an unreadable RNG state with a message at INFO level; the run would then draw other
    dropout masks than the uninterrupted one without a word. Read as accelerate reads it (weights_only, numpy
    allowed): a crafted checkpoint must not run code."""
    from accelerate.utils import load

    try:
        load(os.path.join(path, f"random_states_{rank}.pkl"))
    except Exception as e:
        logger.warning("cannot restore the random state of %s (%s): the run goes on, but its dropout draws differ "
                       "from an uninterrupted run's", path, first_line(e), extra=EVERY_PROCESS)


def restore_schedule(lr_scheduler, state):
    """Load the schedule's position, then set the learning rate the current flags' schedule gives there: the
    optimizer's saved value is the old schedule's (0 at the end of a finished cosine run resumed for more steps)."""
    lr_scheduler.load_state_dict(state)
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    if hasattr(inner, "lr_lambdas"):  # diffusers' schedules are LambdaLR: lr = base_lr * f(step)
        lrs = [base * f(inner.last_epoch) for f, base in zip(inner.lr_lambdas, inner.base_lrs)]
        for group, lr in zip(inner.optimizer.param_groups, lrs):
            group["lr"] = lr
        inner._last_lr = lrs


def truncate_metrics(path, step):
    """Keep the rows up to `step` (all of them but a torn last line a kill may have left)."""
    def row_step(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return None

    if os.path.exists(path):
        with open(path) as f:
            steps = ((line, row_step(line)) for line in f)
            rows = [line.rstrip("\n") + "\n" for line, s in steps if s is not None and s <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


def save_final(accelerator, args, m):
    """LoRA: output_dir/pytorch_lora_weights.safetensors + the kohya file. Full: output_dir is a complete SDXL
    pipeline (with the EMA weights under --use_ema), plus the whole model in one file with --save_single_file."""
    unet, text_encoders = unwrapped(accelerator, m)
    tmp = os.path.join(args.output_dir, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.finetune == "lora":
        os.makedirs(tmp)
        export_trained(args, tmp, unet, text_encoders if args.train_text_encoder else (),
                       prediction_type=m.noise_scheduler.config.prediction_type)
    else:
        if m.ema is not None:
            m.ema.copy_to(unet.parameters())  # training is over: the averaged weights are the result
        pipe = build_pipeline(args, m, unet, for_saving=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        portable_pipeline(tmp)
        if args.save_single_file:  # in the dtype of training (fp32 without mixed precision), as the UNet file was
            from safetensors.torch import save_file
            save_file(sdxl_checkpoint(pipe, m.weight_dtype), os.path.join(tmp, kohya_name(args.output_dir)),
                      metadata=modelspec(args, "stable-diffusion-xl-v1-base", pipe.scheduler.config.prediction_type))
    readable_as_umask_says(tmp)
    ready = os.path.join(args.output_dir, ".export-ready")
    os.replace(tmp, ready)  # complete: from here on, a killed run's successor finishes the move (tidy_output_dir)
    commit_export(args.output_dir, ready)
    logger.info("saved the %s to %s", "LoRA" if args.finetune == "lora" else "pipeline", args.output_dir)


def portable_pipeline(folder):
    """A saved pipeline as the Hub's SDXL folders hold it, which every reader reads. transformers 5 writes CLIP-L's
    weights without their `text_model.` prefix unless it loaded them with one (from a single file it did not):
    transformers 4 then re-initialises that encoder at random without an error, and ComfyUI does not recognise
    it. And it writes each tokenizer as tokenizer.json alone: transformers 4's CLIPTokenizer, the class
    model_index.json names, reads vocab.json and merges.txt."""
    from safetensors.torch import load_file, save_file

    encoder = os.path.join(folder, "text_encoder")
    prefixed = lambda k: k if k.startswith("text_model.") else "text_model." + k
    with open(os.path.join(encoder, "config.json")) as f:
        clip_l = json.load(f).get("architectures") == ["CLIPTextModel"]  # (text_encoder_2 keeps its prefix)
    if clip_l:
        for path in glob.glob(os.path.join(encoder, "*.safetensors")):
            state = load_file(path)
            if any(k != prefixed(k) for k in state):
                save_file({prefixed(k): v for k, v in state.items()}, path, metadata={"format": "pt"})
        for path in glob.glob(os.path.join(encoder, "*.safetensors.index.json")):  # sharded: its map too
            with open(path) as f:
                index = json.load(f)
            index["weight_map"] = {prefixed(k): v for k, v in index["weight_map"].items()}
            with open(path, "w") as f:
                json.dump(index, f, indent=2)
    for name in ("tokenizer", "tokenizer_2"):
        path = os.path.join(folder, name, "tokenizer.json")
        if not os.path.exists(path) or os.path.exists(os.path.join(folder, name, "vocab.json")):
            continue
        with open(path, encoding="utf-8") as f:
            model = json.load(f)["model"]
        if model.get("type") != "BPE":
            continue
        with open(os.path.join(folder, name, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        # transformers 4's CLIPTokenizer skips the first line of merges.txt: the header CLIP's own file has.
        with open(os.path.join(folder, name, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join((m if isinstance(m, str) else " ".join(m)) + "\n"
                                                 for m in model["merges"]))


def commit_export(output_dir, ready):
    """Move each file and folder of the complete export `ready` into output_dir. What one replaces is set aside
    first (renamed into .old-export), never deleted before its replacement is in place: killed at any moment,
    nothing is lost, and the next run finishes the move before it loads anything. (A full fine-tune continued
    in place replaces the pipeline it was loaded from: deleting vae/ before the new one arrived lost it.)"""
    old = os.path.join(output_dir, ".old-export")  # (none is left over: tidy_output_dir removes it first)
    os.makedirs(old, exist_ok=True)
    for name in sorted(os.listdir(ready)):
        final = os.path.join(output_dir, name)
        if os.path.lexists(final):
            os.replace(final, os.path.join(old, name))
        os.replace(os.path.join(ready, name), final)
    os.rmdir(ready)
    shutil.rmtree(old)


def readable_as_umask_says(folder):
    """safetensors (0.8) writes its files readable by their owner only, whatever the umask: a ComfyUI or WebUI
    service running as another user could not open the LoRA. Give every file the mode the umask gives new files."""
    mask = os.umask(0)
    os.umask(mask)
    for parent, _, files in os.walk(folder):
        for f in files:
            with suppress(OSError):  # a file system without modes (FAT, some network mounts)
                os.chmod(os.path.join(parent, f), 0o666 & ~mask)


def unwrapped(accelerator, m):
    return accelerator.unwrap_model(m.unet), [accelerator.unwrap_model(te) for te in m.text_encoders]


# ----------------------------------------------------------------------------------------------------------------
# 8. observe
# ----------------------------------------------------------------------------------------------------------------

def run_validation(accelerator, args, m, step, trackers):
    """One grid per step (a row per prompt, fixed seeds) in samples/step_NNNNNN.png, and to the trackers.
    With --use_ema the EMA weights are shown."""
    unet, text_encoders = unwrapped(accelerator, m)
    was_training = [(model, model.training) for model in (unet, *text_encoders)]
    for model, _ in was_training:  # LoRA dropout off: it would blur the samples and draw from the global RNG,
        model.eval()               # so a resumed run (whose RNG the checkpoint saved) would train differently
    pipe = build_pipeline(args, m, unet, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    if m.ema is not None:
        m.ema.store(unet.parameters())
        m.ema.copy_to(unet.parameters())
    rows = []
    try:
        for n, prompt in enumerate(args.validation_prompt):
            generator = torch.Generator(accelerator.device).manual_seed(args.seed + n)
            with accelerator.autocast(), torch.no_grad(), eager_inference(args):
                rows.append(pipe(prompt, num_inference_steps=args.validation_inference_steps,
                                 num_images_per_prompt=args.num_validation_images, generator=generator,
                                 height=args.resolution, width=args.resolution).images)
    finally:
        if m.ema is not None:
            m.ema.restore(unet.parameters())
        for model, training in was_training:
            model.train(training)
    grid, path = image_grid(rows), grid_path(args.output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path + ".tmp", format="PNG")  # complete or absent: a resumed run redraws an absent one
    os.replace(path + ".tmp", path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"validation": wandb.Image(grid, caption=" | ".join(args.validation_prompt))}, step=step)
    logger.info("validation grid for step %d: %s", step, path)
    return path


def grid_path(output_dir, step):
    return os.path.join(output_dir, "samples", f"step_{step:06d}.png")


def grid_missing(args, step, max_steps):
    """Whether a run starting at `step` draws a grid before training: the base model's at step 0, for comparison,
    or the one a run killed between its checkpoint and its sampling never drew (the final one, say)."""
    if not args.validation_prompt:
        return False
    due = step % args.validation_steps == 0 or step == max_steps
    return step == 0 or (due and not os.path.exists(grid_path(args.output_dir, step)))


def image_grid(rows):
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img, (x * w, y * h))
    return grid


def write_model_card(args, m, source, data, run, repo_id=None):
    """output_dir/README.md: what was trained, on what, with which loss and settings, and how to use it (from
    the Hub repository `repo_id` when the outputs are pushed there)."""
    base = args.pretrained_model_name_or_path
    where = repo_id or args.hub_model_id or args.output_dir
    lora = args.finetune == "lora"
    samples = sorted(os.listdir(os.path.join(args.output_dir, "samples"))) if args.validation_prompt else []
    prediction = m.noise_scheduler.config.prediction_type
    config = f", config={args.single_file_config!r}" if args.single_file_config else ""
    load_base = (f"from_single_file({base!r}{config}, " if os.path.isfile(base) else f"from_pretrained({base!r}, ")
    vae = args.pretrained_vae_model_name_or_path  # trained and validated with it; a full output folder holds it
    load_vae = ""
    if lora and vae:
        load_vae = ("vae = AutoencoderKL." + (f"from_single_file({vae!r}, config={vae_file_config(args)!r}, "
                    "subfolder='vae', "
                    if os.path.isfile(vae) else f"from_pretrained({vae!r}, ") + "torch_dtype=torch.float16)\n")
        load_base += "vae=vae, "
    usage = (f'{load_vae}pipe = StableDiffusionXLPipeline.{load_base}torch_dtype=torch.float16).to("cuda")\n'
             f'pipe.load_lora_weights({where!r}, weight_name="pytorch_lora_weights.safetensors")' if lora else
             f'pipe = StableDiffusionXLPipeline.from_pretrained({where!r}, '
             'torch_dtype=torch.float16).to("cuda")')
    # The base's scheduler as diffusers loads it samples its own type, not one set here or marked in the file.
    sampling = {**(single_file_scheduler(base) if os.path.isfile(base) else {}),
                **({"prediction_type": prediction} if args.prediction_type else {})}
    if lora and sampling:
        usage += ("\npipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, "
                  + ", ".join(f"{k}={v!r}" for k, v in sampling.items()) + ")")
    prompt = args.validation_prompt[0] if args.validation_prompt else "your prompt"
    weight = {"epsilon": "ε-loss weighted by 1/√SNR(t)", "v_prediction": "v-loss weighted by √SNR/(SNR+1)",
              "sample": "x0-loss weighted by √SNR(t)"}.get(prediction)
    import yaml

    header = {"library_name": "diffusers", "tags": ["stable-diffusion-xl", "text-to-image", "diffusers",
                                                    "train_sdxl_debias", *(["lora"] if lora else [])]}
    if not os.path.exists(base):  # the Hub rejects a model card whose base_model is not a Hub id (a local path)
        header["base_model"] = base
    if base.startswith("stabilityai/stable-diffusion-xl"):  # their license; another base's is its author's to say
        header["license"] = "openrail++"
    lines = [
        "---", yaml.safe_dump(header, sort_keys=True).strip(), "---",
        f"# {run_name(args.output_dir)}", "",
        f"{'LoRA (rank ' + str(args.rank) + ')' if lora else 'Full UNet fine-tune'} of `{base}` on `{source}` "
        f"({data}), trained with `train_sdxl_debias.py`.", "",
        f"**Loss:** `{args.loss_weighting}` weighting"
        + (" — the debiased estimation loss of [Debias the Training of Diffusion Models](https://arxiv.org/abs/2310.08442)"
           f" ({weight})" if args.loss_weighting == "debias" else "")
        + f", prediction type `{prediction}`"
        + (", weights normalised to mean 1" if args.normalize_loss_weights else "") + ".", "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in {**run, **card_settings(args, run["processes"])}.items()],
        *(["", f"VAE used for training: `{vae}`."] if vae else []),
        "", "## Use it", "", "```python", "import torch",
        f"from diffusers import {'AutoencoderKL, ' if load_vae else ''}StableDiffusionXLPipeline", usage,
        f'image = pipe({prompt!r}).images[0]', "```", ""]
    if lora and not args.use_dora:
        lines += [f"`{kohya_name(args.output_dir)}` is the same LoRA in kohya's format (kohya's sd-scripts, "
                  "A1111/Forge, ComfyUI).", ""]
    elif lora:
        lines += ["DoRA has no kohya-format equivalent: use `pytorch_lora_weights.safetensors` with diffusers.", ""]
    elif args.save_single_file:
        lines += [f"`{kohya_name(args.output_dir)}` is the whole model in one file, in the original SDXL layout "
                  "(A1111/Forge, ComfyUI's Load Checkpoint).", ""]
    if prediction != "epsilon":  # diffusers reads the scheduler; other tools take a LoRA on an ε base as ε
        lines += [f"Sample it as `{prediction}`: in ComfyUI with a ModelSamplingDiscrete node set to "
                  f"`{ {'sample': 'x0'}.get(prediction, prediction)}`; the WebUIs use the base checkpoint's setting.", ""]
    if samples:
        start = f"the LoRA of `{args.network_weights}`" if args.network_weights else "the base model"
        lines += ["## Validation images", "", f"Prompts: {' | '.join(args.validation_prompt)}; first grid: {start} "
                  "before training.", ""] + [f"![{s}](samples/{s})" for s in samples] + [""]
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def card_settings(args, processes):
    """The flags a reader needs to repeat the run, as trained: the learning rate --scale_lr gave, LoRA's shape."""
    keys = ("resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "aspect_ratio_bucketing", "train_text_encoder", "use_ema", "noise_offset", "seed")
    keys += ("rank", "lora_alpha", "lora_target_modules", "network_weights") * (args.finetune == "lora")
    settings = {k: getattr(args, k) for k in keys if k != "network_weights" or args.network_weights}
    if args.scale_lr:
        scale = lr_scale(args, processes)
        settings["learning_rate"] = f"{args.learning_rate:g} × {scale} (--scale_lr) = {args.learning_rate * scale:g}"
    return settings


def plot_losses(output_dir):
    """loss.png: the loss curve and the mean loss per timestep bucket, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    buckets = sorted(k[len("loss_"):] for k in rows[0] if k.startswith("loss_t_"))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "weighted loss"), ("mse", "plain MSE")):  # skipped steps: gaps, not dips to 0
        a.plot([r["step"] for r in rows], [np.nan if r[key] is None else r[key] for r in rows], label=label)
    a.set_xlabel("step"), a.legend()
    for key, offset in (("loss", -0.2), ("mse", 0.2)):
        means = [np.mean(v) if (v := [r[f"{key}_{t}"] for r in rows if r[f"{key}_{t}"] is not None]) else 0.0
                 for t in buckets]
        b.bar(np.arange(len(buckets)) + offset, means, width=0.4, label=key)
    b.set_xticks(range(len(buckets)), [t[2:].replace("_", "–") for t in buckets], rotation=45, fontsize=7)
    b.set_xlabel("timestep bucket"), b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "loss.png"))
    plt.close(fig)
    return os.path.join(output_dir, "loss.png")


def resolve_trackers(args):
    """--report_to → accelerate's log_with. Default: tensorboard when installed, else nothing."""
    import importlib.util

    def installed(name):
        return importlib.util.find_spec(name) is not None

    if args.report_to is None:
        return ["tensorboard"] if installed("tensorboard") else []
    if args.report_to == "none":
        return []
    names = ["tensorboard", "wandb"] if args.report_to == "all" else [n.strip() for n in args.report_to.split(",")]
    for name in names:
        if name not in ("tensorboard", "wandb"):
            raise UserError(f"--report_to {name!r} is not supported; use tensorboard, wandb, all or none")
        if not installed(name):
            raise UserError(f"--report_to {name} needs the {name} package: pip install {name}")
    return names


class NonFiniteGuard:
    """Skip an update whose loss or gradient is NaN/Inf; stop after --max_nonfinite_steps in a row.

    The loss is summed over ranks and the gradient norm is global (after DDP's all-reduce), so every rank takes
    the same decision. Taking it on the host would cost a sync per step: the CPU would wait for the GPU to finish
    before queueing the next step's kernels, and the GPU would idle meanwhile. So with torch's AdamW the decision
    stays on the device: the flag goes to the optimizer as `found_inf`, the hook torch's GradScaler uses, and the
    fused kernel leaves weights, moments and step count as they were. The host reads the flags later, all at
    once: before a log row, a checkpoint or a validation (which sync anyway), and after --max_nonfinite_steps
    unread steps, so a diverged run still stops within that many steps. Optimizers without the hook (8-bit
    AdamW, Adafactor, Prodigy), --use_ema (whose average would still move) and fp16 decide on the host, one sync
    per optimizer step. Under fp16 inf gradients are routine while the grad scaler calibrates: there only a
    non-finite loss counts, and the scaler's own skip handles the gradients."""

    def __init__(self, args, accelerator, optimizer):
        self.args, self.accelerator, self.in_a_row, self.unread = args, accelerator, 0, []
        self.inner = optimizer
        while hasattr(self.inner, "optimizer"):  # accelerate's wrapper
            self.inner = self.inner.optimizer
        self.on_device = (getattr(self.inner, "_step_supports_amp_scaling", False) and accelerator.scaler is None
                          and not args.use_ema)

    def step(self, update, grad_norm, metrics, step):
        """Run `update()` (optimizer and EMA step) unless this step's loss or gradient is non-finite."""
        accelerator = self.accelerator
        loss = accelerator.reduce(metrics.window_loss().to(accelerator.device).float(), reduction="sum")
        finite = torch.isfinite(loss)
        # DeepSpeed clips inside its engine and returns no norm; fp16's scaler handles inf gradients itself.
        if grad_norm is not None and accelerator.mixed_precision != "fp16":
            finite = finite & torch.isfinite(grad_norm)
        self.unread.append((step, finite, loss, grad_norm, metrics.window_timesteps()))
        if self.on_device:
            self.inner.found_inf, self.inner.grad_scale = (~finite).float(), None
            try:
                update()
            finally:
                del self.inner.found_inf, self.inner.grad_scale
            metrics.end_step(keep=finite)
            if len(self.unread) >= self.args.max_nonfinite_steps:
                self.settle()
            return
        keep = bool(finite)
        if keep:
            update()  # under fp16 the grad scaler itself skips steps with inf gradients
        elif accelerator.scaler is not None:
            accelerator.scaler.update()  # clipping unscaled the gradients; the scaler must close this step
        metrics.end_step(keep=keep)
        self.settle()

    def settle(self):
        """Read the unread steps' verdicts (one host sync): warn about skipped updates, stop after too many."""
        if not self.unread:
            return
        unread, self.unread = self.unread, []
        flags = torch.stack([verdict[1] for verdict in unread]).tolist()  # the sync
        for (step, _, loss, grad_norm, timesteps), finite in zip(unread, flags):
            if finite:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s) at timesteps %s; update "
                           "skipped (%d in a row)", step + 1, float(loss),
                           None if grad_norm is None else float(grad_norm), timesteps.tolist(), self.in_a_row)
            if self.in_a_row >= self.args.max_nonfinite_steps:
                found = list_checkpoints(self.args.output_dir)
                last = found[-1][1] if found else "none yet"
                raise TrainingStopped(f"the loss or gradients were NaN/Inf for {self.in_a_row} steps in a row "
                                      f"(last at step {step + 1}); stopped. Last good checkpoint: {last}. Lower "
                                      "the --learning_rate, keep --max_grad_norm, or prefer bf16 over fp16")


class MetricsLog:
    """Per-timestep-bucket sums of the weighted loss and the plain MSE, kept on the device between logs (no host
    sync per step), reduced over ranks when a metrics.jsonl row is written. Like minRF's per-t bins, the
    buckets show what a weighting does: where in t the loss, and the error, sit.

    Samples enter a per-step window first; a skipped (non-finite) step's window is dropped, not logged."""

    def __init__(self, path, num_train_timesteps, bins=10):
        self.path, self.T, self.bins = path, num_train_timesteps, bins
        width = num_train_timesteps / bins
        self.labels = [f"t_{round(b * width):03d}_{round((b + 1) * width) - 1:03d}" for b in range(bins)]
        self.window, self.totals, self.t0 = None, None, time.perf_counter()

    def add(self, stats):
        t = stats["timesteps"]
        if self.window is None:
            self.window = {"loss": torch.zeros(self.bins, device=t.device), "mse": torch.zeros(self.bins, device=t.device),
                           "n": torch.zeros(self.bins, device=t.device), "t": []}
        b = (t * self.bins // self.T).clamp(max=self.bins - 1)
        for k, v in (("loss", stats["loss"]), ("mse", stats["mse"]), ("n", torch.ones_like(stats["loss"]))):
            self.window[k].index_add_(0, b, v.float())
        self.window["t"].append(t)

    def window_loss(self):
        return self.window["loss"].sum() if self.window else torch.zeros(())

    def window_timesteps(self):
        return torch.cat(self.window["t"]) if self.window else torch.zeros(0, dtype=torch.long)

    def end_step(self, keep):
        """Add the step's window to the totals if `keep`: a bool, or a bool tensor still on the device."""
        if self.window is not None:
            if self.totals is None:
                self.totals = {k: torch.zeros_like(self.window[k]) for k in ("loss", "mse", "n")}
            keep = torch.as_tensor(keep, device=self.window["n"].device)
            for k in self.totals:  # where(), not a product: a skipped step's NaN times 0 is still NaN
                self.totals[k] += torch.where(keep, self.window[k], 0.0)
        self.window = None

    def flush(self, step, epoch, lr, grad_norm, accelerator):
        totals = self.totals or {k: torch.zeros(self.bins) for k in ("loss", "mse", "n")}
        sums = accelerator.reduce(torch.stack([totals["loss"], totals["mse"], totals["n"]]).to(accelerator.device),
                                  reduction="sum").cpu()
        loss, mse, n = sums.tolist()
        count = sum(n)  # 0 when every step since the last row was skipped: its values are null, not 0
        row = {"step": step, "epoch": epoch, "loss": sum(loss) / count if count else None,
               "mse": sum(mse) / count if count else None, "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm),
               "samples_per_s": count / (time.perf_counter() - self.t0) if count else None}
        for label, lb, mb, nb in zip(self.labels, loss, mse, n):
            row[f"loss_{label}"] = lb / nb if nb else None
            row[f"mse_{label}"] = mb / nb if nb else None
        # A skipped step's NaN/Inf gradient norm as null: NaN is no JSON (JavaScript's parser and others refuse it).
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        if accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.totals, self.t0 = None, time.perf_counter()
        return row


# ----------------------------------------------------------------------------------------------------------------
# 9. main
# ----------------------------------------------------------------------------------------------------------------

def setup(args):
    """Accelerator, logging, seeds. Multi-GPU via `accelerate launch`; several CPU processes via torchrun."""
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, ProjectConfiguration,
                                  broadcast_object_list, set_seed)

    trackers = resolve_trackers(args)
    ddp = DistributedDataParallelKwargs()  # (find_unused_parameters: make_optimization, once the LoRA is known)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers or None, kwargs_handlers=[ddp],
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:  # job-wide warnings once; a process's own (its share of the images) too
        logger.addFilter(lambda record: record.levelno >= logging.ERROR or getattr(record, "every_process", False))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each would train alone, all into one output_dir
        raise UserError(f"launched as {launched} processes, but they did not join one group (each runs alone on "
                        f"{accelerator.device.type}): on a machine without GPUs set ACCELERATE_USE_CPU=1 for torchrun, "
                        "or use accelerate launch --cpu")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("fp16 mixed precision needs a GPU (CPU autocast has no fp16 convolutions): "
                        "use --mixed_precision bf16 or no on the CPU")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        check_deepspeed_accumulation(args, accelerator.state.deepspeed_plugin.deepspeed_config)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prefer_sdpa_backend(args.sdpa_backend)
    refused = None
    if accelerator.is_main_process:
        args.made_output_dir = outermost_missing(args.output_dir)  # (removed again if the start fails: main)
        os.makedirs(args.output_dir, exist_ok=True)
        try:  # before tidying: another live run's half-written checkpoint is its own
            lock_output_dir(args.output_dir)
        except UserError as e:
            refused = str(e)
        else:
            tidy_output_dir(args.output_dir)
    # Every process stops on the main one's refusal, alike, rather than on a peer that left without a word.
    refused = broadcast_object_list([refused])[0] if accelerator.num_processes > 1 else refused
    if refused:
        raise UserError(refused)
    return accelerator


_LOCK = None  # the open lock file of lock_output_dir, held until the process ends


def check_deepspeed_accumulation(args, config):
    """DeepSpeed accumulates inside its engine, by its config's count, and accelerate ends an accumulation only
    inside `accelerator.accumulate`, which this loop does not use (it counts micro-batches itself, for exact
    resumes): with a count above 1 on either side, steps, the LR schedule and the loss scale would go wrong."""
    value = config.get("gradient_accumulation_steps", "auto")
    if args.gradient_accumulation_steps > 1 or value not in ("auto", 1):
        raise UserError(f"gradient accumulation is not supported with DeepSpeed yet (--gradient_accumulation_steps "
                        f"{args.gradient_accumulation_steps}, the DeepSpeed config's gradient_accumulation_steps "
                        f"{value}): set both to 1 and raise --train_batch_size, or use DDP or FSDP")


def lock_output_dir(output_dir):
    """One run per output_dir: a job requeued while the old one still runs would interleave checkpoints and
    metrics with it. The lock is the kernel's (flock), so a killed run leaves none behind; where the file system
    has no locks (some network mounts) or Python has no fcntl (Windows) there is no check."""
    global _LOCK
    try:
        import fcntl
    except ImportError:
        return
    path = os.path.realpath(os.path.join(output_dir, ".lock"))
    if _LOCK is not None:  # a second run in this process (tests, notebooks): this process's lock is no obstacle
        if _LOCK.name == path:
            return
        _LOCK.close()
        _LOCK = None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"another run is training in {output_dir} ({holder}): wait for it to end, stop it, or "
                        "pass another --output_dir") from None
    except OSError as e:  # no lock support here
        logger.info("cannot lock %s (%s): nothing stops a second run from training in it at the same time",
                    output_dir, e.strerror)
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCK = f


def outermost_missing(folder):
    """The outermost of `folder` and its parents that does not exist yet (None if `folder` does)."""
    folder, made = os.path.abspath(folder), None
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder, made = os.path.dirname(folder), folder
    return made


def forget_output_dir(args):
    """A run that stops before it starts (bad data found after setup, say) removes the folders it made for its
    output, which hold only its lock: none is left behind for the user to clean up. Only while this process
    holds that lock: a run refused because another holds it leaves the other's folder alone."""
    global _LOCK
    top = getattr(args, "made_output_dir", None)
    lock = top and os.path.realpath(os.path.join(args.output_dir, ".lock"))
    if not top or _LOCK is None or _LOCK.name != lock or os.listdir(args.output_dir) != [".lock"]:
        return
    _LOCK.close()
    _LOCK = None
    os.remove(lock)
    folder = os.path.abspath(args.output_dir)
    while True:  # the output folder, then each parent this run made, while empty
        with suppress(OSError):
            os.rmdir(folder)
        if folder == top or os.path.exists(folder):
            return
        folder = os.path.dirname(folder)


def tidy_output_dir(output_dir):
    """What a killed run left in output_dir (only our own names): half-written checkpoints and exports go; a
    complete export is moved into place (commit_export), and the versions it replaced go; a checkpoint set aside
    to be replaced (save_checkpoint) goes back in place if its replacement never arrived."""
    # Old versions first: every name not yet moved in has its new version in .export-ready.
    shutil.rmtree(os.path.join(output_dir, ".old-export"), ignore_errors=True)
    if os.path.isdir(os.path.join(output_dir, ".export-ready")):
        commit_export(output_dir, os.path.join(output_dir, ".export-ready"))
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith((".tmp-checkpoint-", ".tmp-export")):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".old-checkpoint-"):
            final = os.path.join(output_dir, name[len(".old-"):])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)


def claim_output_dir(args, accelerator, global_step):
    """Just before training, once data, models and caches are known good (a failed start loses nothing):
    --overwrite_output_dir removes the previous run's checkpoints and results; a run from step 0 the metrics of
    one killed before its first checkpoint (it would log the same steps again) and earlier validation grids; the
    run's config is written."""
    global claimed, removing
    if accelerator.is_main_process:
        if args.overwrite_output_dir and global_step:  # (a requeued job's script or a --config may pass both)
            logger.warning("--overwrite_output_dir is ignored: the run continues from step %d of "
                           "--resume_from_checkpoint", global_step)
        if args.overwrite_output_dir and not global_step:  # (`latest` with no checkpoint: a new run)
            checkpoints, results = list_checkpoints(args.output_dir), previous_results(args)
            removing = bool(checkpoints or results)  # (a Ctrl-C from here on finds them partly removed)
            for step, old in checkpoints:
                remove_checkpoint(args.output_dir, step, old)
            remove_outputs(results)
        elif global_step:
            prune_checkpoints(args)  # a run killed between saving a checkpoint and pruning the oldest
        for name in ("metrics.jsonl", "metrics.jsonl.tmp") if global_step == 0 else ("metrics.jsonl.tmp",):
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        if global_step == 0:
            remove_grids(args.output_dir)
        with open(os.path.join(args.output_dir, "train_config.json"), "w") as f:  # rerun with --config this file
            json.dump({**{k: v for k, v in vars(args).items() if k not in NOT_SAVED},
                       "mixed_precision": accelerator.mixed_precision}, f, indent=2)  # also when the launcher set it
    accelerator.wait_for_everyone()
    claimed = True


PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def previous_results(args):
    """--overwrite_output_dir: the previous run's results in output_dir (the paths there), by the names this
    trainer writes them under, so that none is left beside the new run's (a LoRA's kohya file beside a DoRA, LoRA
    files beside a full pipeline). Other files stay, and all of them where output_dir and what this run reads
    overlap (a full fine-tune continued in place: its pipeline is the base model this run loaded)."""
    out = args.output_dir
    inputs = [p for p in (args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path,
                          args.train_data_dir or args.dataset, args.network_weights) if p and os.path.exists(p)]
    if any(inside(p, out) or inside(out, p) for p in inputs):
        logger.info("--overwrite_output_dir: %s holds or is inside what this run reads (model, VAE or data): only "
                    "its checkpoints are removed", out)
        return []
    names = ["pytorch_lora_weights.safetensors", kohya_name(out), "README.md", "loss.png",
             run_name(out) + "_unet.safetensors"]  # (earlier versions' --save_single_file)
    if os.path.exists(os.path.join(out, "model_index.json")):  # a pipeline: its folders, then its index
        names = [*PIPELINE_FOLDERS, *names, "model_index.json"]
    return [path for path in (os.path.join(out, n) for n in names) if os.path.lexists(path)]


def remove_outputs(paths):
    """Remove previous_results' files and folders."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                os.remove(path)


def inside(path, folder):
    """Whether `path` is `folder` or below it."""
    if not isinstance(path, str) or not folder:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def remove_grids(output_dir):
    """An earlier run's validation grids (samples/step_*.png; other files there stay): the model card would
    show them as this run's."""
    for grid in glob.glob(os.path.join(glob.escape(output_dir), "samples", "step_*.png")):
        os.remove(grid)


def loader_workers(args, accelerator, decoding=True):
    """--dataloader_num_workers, or enough processes that decoding and resizing images (tens of ms per 1024²
    JPEG) overlap the GPU's step instead of preceding it, leaving a CPU to the training process itself."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    if not decoding:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cpus // accelerator.num_processes - 1))


def make_sampler(args, groups, accelerator):
    """This rank's batches; a dataset too small for one optimizer step is refused here, before the models load."""
    world, accum = accelerator.num_processes, args.gradient_accumulation_steps
    sampler = BatchSampler(groups, args.train_batch_size, args.seed, world, accelerator.process_index, accum)
    if len(sampler) == 0:
        raise UserError(f"the dataset has {len(groups)} usable images, fewer than one optimizer step needs "
                        f"(batch {args.train_batch_size} × accumulation {accum} × {world} processes"
                        + (", per aspect-ratio bucket" if args.aspect_ratio_bucketing else "") + "): lower "
                        "--train_batch_size or --gradient_accumulation_steps, or add images")
    left = len(groups) - len(sampler) * args.train_batch_size * world
    if left:  # diffusers' loader would run a smaller last batch; here batches and steps are whole on every rank
        logger.info("%d of %d samples are left out of each epoch (a different %d each time): batches and optimizer "
                    "steps are whole on every process", left, len(groups), left)
    return sampler


def make_loader(args, table, plan, sampler, accelerator):
    workers = loader_workers(args, accelerator, decoding=plan.latent_cache is None)
    # Its own generator: iterating must not draw from the global RNG, or a resumed run's dropout would shift.
    return torch.utils.data.DataLoader(ImageCaptionDataset(table, args, plan), batch_sampler=sampler,
                                       collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                       worker_init_fn=leave_stop_requests_to_the_trainer)


def leave_stop_requests_to_the_trainer(worker_id):
    """Loader workers ignore SIGTERM: sent to the whole job (SLURM), it would kill them first, and torch would
    end the run with "DataLoader worker is killed by signal" instead of the trainer's clean stop. The trainer
    stops them itself (workers_stopped), and they exit on their own if it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = quiet_hang_ups
    if _LOCK is not None:  # the output_dir lock goes with the trainer, not with workers that outlive it a moment
        _LOCK.close()


def quiet_hang_ups(kind, value, traceback):
    """A worker's thread that hands batches' shared memory to the trainer reports, through sys.excepthook, the
    trainer hanging up in mid-transfer, which is how stopping the workers at the end of a run looks to it (a
    traceback under the run's last line). Nothing is lost then; other errors are printed as usual."""
    from multiprocessing import AuthenticationError
    if not issubclass(kind, (EOFError, OSError, AuthenticationError)):
        sys.__excepthook__(kind, value, traceback)


@contextmanager
def workers_stopped(loader):
    """Iterate a loader of persistent workers inside this: they are stopped when the block ends, however it ends.
    Left to Python's exit, which stops leftover workers with SIGTERM (ignored, above) and then waits for them,
    an error whose traceback still held the loader's iterator (a CUDA OOM, a full disk) never ended the process."""
    try:
        yield
    finally:
        iterator = getattr(loader, "_iterator", None)  # where torch keeps the persistent workers' iterator
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def lr_schedule(args, optimizer, max_steps):
    """diffusers' --lr_scheduler, over max_steps optimizer steps, with --lr_num_cycles and --lr_power."""
    from diffusers.optimization import get_scheduler

    name = args.lr_scheduler
    if name == "constant" and args.lr_warmup_steps:  # diffusers' "constant" ignores warmup silently
        name = "constant_with_warmup"
        logger.info("--lr_scheduler constant with --lr_warmup_steps %d: warming up over those steps, as "
                    "constant_with_warmup (diffusers' constant would ignore them; drop the flag for none)",
                    args.lr_warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps,
                         num_cycles=args.lr_num_cycles, power=args.lr_power)


def lr_scale(args, processes):
    """--scale_lr's factor: the samples one optimizer step takes (1 without the flag)."""
    return args.train_batch_size * args.gradient_accumulation_steps * processes if args.scale_lr else 1


def make_optimization(args, m, accelerator, max_steps):
    groups = param_groups(args, m, lr_scale(args, accelerator.num_processes))
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(args, groups, accelerator.device)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process, which shortens warmup and
    # decay with more GPUs. Here it steps once per optimizer step, whatever the process count or accumulation.
    lr_scheduler = lr_schedule(args, optimizer, max_steps)
    if args.train_text_encoder and accelerator.ddp_handler is not None:
        # Text encoder 1 contributes its penultimate layer only: a LoRA on its last layer (from --network_weights
        # or an older checkpoint) gets no gradient, which DDP must be told, or it waits for it forever.
        accelerator.ddp_handler.find_unused_parameters = any(
            p.requires_grad and unused_layer(m.text_encoders[0]) in n for n, p in m.text_encoders[0].named_parameters())
    if args.train_text_encoder:
        m.unet, *m.text_encoders, optimizer = accelerator.prepare(m.unet, *m.text_encoders, optimizer)
    else:
        m.unet, optimizer = accelerator.prepare(m.unet, optimizer)
    register_checkpoint_hooks(accelerator, args, m)
    return params, optimizer, lr_scheduler


def train(args):
    from tqdm.auto import tqdm

    accelerator = setup(args)
    table, source = load_table(args)  # data errors surface before the (slow) model load
    table, plan, groups = plan_data(args, table, accelerator.is_local_main_process)
    args.data_fingerprint = plan.fingerprint(table["text"])  # a resume names a changed dataset
    sampler = make_sampler(args, groups, accelerator)
    m = load_models(args, accelerator)
    if args.cache_latents or caches_text(args):
        build_caches(args, m, table, plan, accelerator)
    loader = make_loader(args, table, plan, sampler, accelerator)
    report = DataReport()  # (the files this first sample skips are in its closing count too)
    report.check_batch(collate([loader.dataset[(0, 0)]]))  # every image unreadable: said before a removal
    world, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // accum
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    params, optimizer, lr_scheduler = make_optimization(args, m, accelerator, max_steps)
    torch.manual_seed(derive_seed(args.seed, "dropout", rank))  # distinct dropout per rank; restored on resume
    global_step = resume(accelerator, args, optimizer, lr_scheduler) if args.resume_from_checkpoint else 0
    if global_step > max_steps:
        raise UserError(f"the checkpoint is at step {global_step}, past this run's {max_steps} steps: raise "
                        "--max_train_steps (or --num_train_epochs) to train on, or resume an earlier checkpoint")
    claim_output_dir(args, accelerator, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_sdxl_debias", config={k: v for k, v in vars(args).items() if k not in
                                                               NOT_CONFIG and isinstance(v, (int, float, str, bool))})
    what = f"LoRA rank {args.rank}" if args.finetune == "lora" else "full UNet"
    if args.finetune == "lora" and args.learning_rate <= 1e-5:  # diffusers' full-SDXL command, without --finetune full
        logger.warning("a LoRA at --learning_rate %g barely moves: that is a full fine-tune's rate (add --finetune "
                       "full, which diffusers' train_text_to_image_sdxl.py trains); LoRAs train at about 1e-4",
                       args.learning_rate)
    if args.finetune == "lora" and args.use_dora:
        logger.info("--use_dora: only pytorch_lora_weights.safetensors (diffusers) is written; kohya's LoRA format, "
                    "which A1111/Forge and ComfyUI read, has no DoRA")
    logger.info("training %s of %s with %s loss (%s) on %s: %s, %d epochs, %d steps, effective batch "
                "%d (%d per device × %d processes × %d accumulation)", what, args.pretrained_model_name_or_path,
                args.loss_weighting, m.noise_scheduler.config.prediction_type, source, plan.describe(), num_epochs,
                max_steps, args.train_batch_size * world * accum, args.train_batch_size, world, accum)

    metrics = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), m.noise_scheduler.config.num_train_timesteps)
    generator = torch.Generator(accelerator.device)
    bar = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    trained = [m.unet] + (m.text_encoders if args.train_text_encoder else [])
    first_epoch = num_epochs if global_step >= max_steps else global_step // steps_per_epoch  # already done
    # Closed however the run ends: the bar (so an error is the last line) and the loader's workers.
    with bar as progress, workers_stopped(loader):
        nonfinite, heap = NonFiniteGuard(args, accelerator, optimizer), HeapFreezer()
        if grid_missing(args, global_step, max_steps) and accelerator.is_main_process:
            run_validation(accelerator, args, m, global_step, accelerator.trackers)
        for model in trained:
            model.train()
        for epoch in range(first_epoch, num_epochs):
            resume_in_epoch = epoch == global_step // steps_per_epoch
            sampler.set_epoch(epoch, skip=(global_step % steps_per_epoch) * accum if resume_in_epoch else 0)
            for i, batch in enumerate(loader):
                micro, last_micro = i % accum, i % accum == accum - 1
                # Noise and timesteps are a pure function of (seed, rank, step, micro-batch): a resumed run draws
                # exactly what the uninterrupted run drew.
                generator.manual_seed(derive_seed(args.seed, "noise", rank, global_step, micro))
                report.check_batch(batch)  # (empty only when every image failed: each rank finds that alike)
                with no_sync(accelerator, trained, not last_micro):  # gradients all-reduce once per step
                    loss, stats = training_step(batch, m, args, generator, new_step=micro == 0)
                    accelerator.backward(loss / accum)
                metrics.add(stats)
                if not last_micro:
                    continue
                lr, grad_norm = update_weights(accelerator, args, m, params, optimizer, lr_scheduler, metrics,
                                               nonfinite, global_step)
                global_step += 1
                progress.update(1)
                heap.after_step()
                after_step(accelerator, args, m, metrics, nonfinite, progress, global_step, max_steps, epoch, lr,
                           grad_norm, lr_scheduler)
                if global_step >= max_steps:
                    break
            if global_step >= max_steps:
                break
    report.finish(accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator, args, m)
        log = os.path.join(args.output_dir, "metrics.jsonl")
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
        logged = [r["loss"] for r in rows if r["loss"] is not None]  # null: a row of non-finite (skipped) steps only
        run = {"steps": global_step, "epochs": num_epochs, "processes": world, "mixed_precision":
               accelerator.mixed_precision, "last logged loss": f"{logged[-1]:.4g}" if logged else "-"}
        write_model_card(args, m, source, plan.describe(), run)
        plot_losses(args.output_dir)
        if args.push_to_hub:
            repo_id = create_hub_repo(args)
            write_model_card(args, m, source, plan.describe(), run, repo_id)  # its usage code loads from the Hub now
            push_to_hub(args, repo_id)
    # Every process leaves the group together, as diffusers' scripts do: process 1 tearing its end down while the
    # main one still saved aborted once in CI ("terminate called without an active exception", gloo).
    accelerator.wait_for_everyone()
    accelerator.end_training()


def no_sync(accelerator, models, skip_sync):
    """DDP's no_sync on every trained model while accumulating (all-reduce only on the last micro-batch)."""
    stack = ExitStack()
    if skip_sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def update_weights(accelerator, args, m, params, optimizer, lr_scheduler, metrics, nonfinite, global_step):
    """Clip; step the optimizer (and EMA) unless the loss or gradient is non-finite; advance the schedule.
    Returns the learning rate this step used and the gradient norm."""
    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or math.inf)  # 0: no clipping, as in kohya's

    def update():
        optimizer.step()
        if m.ema is not None:
            m.ema.step(accelerator.unwrap_model(m.unet).parameters())

    nonfinite.step(update, grad_norm, metrics, global_step)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


HEAP_FREEZE_STEPS = 3  # torch.compile compiles in a run's first step; CUDA graphs record in its second and third


class HeapFreezer:
    """After each of a run's first HEAP_FREEZE_STEPS steps, and after any later one that compiled new graphs (a
    new bucket shape): one garbage collection, then every object still alive is left out of later ones
    (gc.freeze). Loading the models and compiling them leave ~600 k long-lived objects (609 k with the tiny UNet
    compiled), and Python's full collection walks them all whenever enough new objects have survived since the
    last one: 0.4-0.5 s on this project's CPU, a pause the GPU waits out with an empty queue. Frozen, a full
    collection takes 0.04 ms. Objects freed by reference counting (almost all a step makes) are freed as before;
    main() unfreezes when the run ends."""

    def __init__(self):
        self.steps, self.graphs = 0, 0

    def after_step(self):
        self.steps += 1
        dynamo = sys.modules.get("torch._dynamo.utils")  # (loaded by --compile)
        graphs = dynamo.counters["stats"]["unique_graphs"] if dynamo else 0
        if self.steps <= HEAP_FREEZE_STEPS or graphs > self.graphs:
            gc.collect()
            gc.freeze()
        self.graphs = graphs


class DataReport:
    """Names the files the loader skipped, and fails clearly, before the step counts, when a batch is empty:
    the dataset replaces a failed image from any bucket, so that means every file passed the header scan but
    none decodes."""

    def __init__(self):
        self.skipped = set()

    def check_batch(self, batch):
        self.skipped.update(batch["skipped"])
        if "captions" not in batch:
            raise UserError(f"every image failed to load ({len(self.skipped)} files, e.g. {min(self.skipped)}): "
                            "check that they open in an image viewer, or re-export them")

    def finish(self, accelerator):
        """Every process's skipped files, said once by the main one (each decoded its own share)."""
        from accelerate.utils import gather_object

        skipped = set().union(*gather_object([self.skipped])) if accelerator.num_processes > 1 else self.skipped
        if skipped and accelerator.is_main_process:
            logger.warning("skipped %d unreadable image(s) in all: %s", len(skipped), ", ".join(sorted(skipped)[:50]))


def after_step(accelerator, args, m, metrics, nonfinite, progress, global_step, max_steps, epoch, lr, grad_norm,
               lr_scheduler):
    """Log, checkpoint and validate on their cadences, and at the last step. The last checkpoint is what makes a
    finished run extendable (a larger --max_train_steps), a requeued `latest` a no-op, and a second run into the
    folder a refusal instead of an overwrite; --checkpoints_total_limit bounds the disk it takes."""
    last = global_step == max_steps
    log = global_step % args.logging_steps == 0 or last
    save = global_step % args.checkpointing_steps == 0 or last
    sample = args.validation_prompt and (global_step % args.validation_steps == 0 or last)
    if log or save or sample:
        nonfinite.settle()  # nothing is logged or saved past a step whose verdict is unread
    # A checkpoint ends a metrics row too: the steps since the last row would otherwise be lost on resume.
    if log or save:
        row = metrics.flush(global_step, epoch, lr, grad_norm, accelerator)
        progress.set_postfix(loss="-" if row["loss"] is None else f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
    if save:
        save_checkpoint(accelerator, args, global_step, epoch, lr_scheduler)
    if sample and accelerator.is_main_process:
        run_validation(accelerator, args, m, global_step, accelerator.trackers)
    if save or sample:  # samples_per_s measures training, not checkpoint writing or sampling
        metrics.t0 = time.perf_counter()


def create_hub_repo(args):
    """The Hub repository for --push_to_hub (created if missing), as "user/name", for the model card's usage
    code."""
    from huggingface_hub import create_repo

    try:
        return create_repo(args.hub_model_id or run_name(args.output_dir),
                           exist_ok=True, token=args.hub_token).repo_id
    except Exception as e:
        raise UserError(f"creating the Hub repository failed ({first_line(e)}); the outputs are safe in "
                        f"{args.output_dir}") from None


def push_to_hub(args, repo_id):
    from huggingface_hub import upload_folder

    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="train_sdxl_debias",
                      token=args.hub_token, ignore_patterns=["checkpoint-*/**", ".tmp-*/**", ".old-*/**", ".lock",
                                                             f"{args.logging_dir}/**", "cache/**"])
    except Exception as e:
        raise UserError(f"push to the Hub failed ({first_line(e)}); the outputs are safe in {args.output_dir}") from None
    logger.info("pushed %s to https://huggingface.co/%s", args.output_dir, repo_id)


interrupted_by = signal.SIGINT
ending = False  # main() is saying how the run ended
claimed = False  # claim_output_dir has run: --overwrite_output_dir has removed the previous run's results
removing = False  # --overwrite_output_dir has begun removing them


def on_stop(signum, frame):
    """Ctrl-C, or a scheduler's (SLURM, Kubernetes) or torchrun's stop request: the run ends as on Ctrl-C. Once
    it is ending, later requests are ignored: torchrun signals every process again while they wind down, and
    each would print a traceback under the one line already said."""
    global interrupted_by
    if ending:
        return
    interrupted_by = signum
    raise KeyboardInterrupt


def config_origin(message, args):
    """' (--x is set in --config f)' when the error names a flag that came from the config file, not the
    command line the user is looking at."""
    named = list(dict.fromkeys(f for f in re.findall(r"--\w+", message) if f in getattr(args, "config_flags", ())))
    if not named or message.startswith("--config"):
        return ""
    return f" ({', '.join(named)} {'is' if len(named) == 1 else 'are'} set in --config {args.config!r})"


def resume_hint(args):
    """What an interrupted run can be continued from: its latest checkpoint, the one it resumed from, or none."""
    if args is not None and args.overwrite_output_dir and not claimed and removing:
        return (" while --overwrite_output_dir was removing the previous run's results (some are gone): rerun the "
                "same command to start afresh")
    if args is not None and args.overwrite_output_dir and not claimed:  # (its checkpoints are the previous run's)
        return " before it began, the previous run's results untouched: rerun the same command to start afresh"
    if args is not None and list_checkpoints(args.output_dir):
        return ": rerun with --resume_from_checkpoint latest to continue"
    if args is not None and args.resume_from_checkpoint not in (None, "latest"):
        return f" before a new checkpoint: rerun the same command to continue from {args.resume_from_checkpoint}"
    return " before the first checkpoint (--checkpointing_steps): nothing to resume, a rerun starts from step 0"


def main(argv=None):
    global ending, claimed, removing
    args, ending, claimed, removing = None, False, False, False
    try:
        args = parse_args(argv)
        validate(args)
        train(args)
    except BaseException as e:
        ending = True
        return report(e, args)
    finally:
        gc.unfreeze()  # (HeapFreezer's objects: a second run in this process may collect the first's)
    return 0


def report(e, args):
    """How a run that raised `e` ends: one line and an exit code for what a user can act on; anything else is
    raised again, with its traceback."""
    # What every process finds alike is said once per machine, by its first process (so a path missing on one
    # machine of several is still named).
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if isinstance(e, UserError):
        if first:
            print(f"error: {e}{config_origin(str(e), args)}", file=sys.stderr)
        forget_output_dir(args)
        return 3 if isinstance(e, TrainingStopped) else 2
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C: checkpoints are complete or absent: `latest` goes on from the last
        if first:
            print(f"\ninterrupted{resume_hint(args)}", file=sys.stderr)
        forget_output_dir(args)  # (stopped while starting: no folder holding only its lock is left)
        return 128 + interrupted_by
    if isinstance(e, torch.cuda.OutOfMemoryError):  # the settings don't fit the card: say which ones shrink the step
        print(f"error: out of GPU memory ({first_line(e).split('. GPU')[0]}): {smaller_step(args)}; checkpoints "
              "are complete or absent: rerun with --resume_from_checkpoint latest", file=sys.stderr)
        return 2
    folder = args and isinstance(e, PermissionError) and next(
        (d for d in (args.output_dir, args.data_cache_dir) if inside(e.filename, d)), None)
    if folder:
        print(f"error: cannot access {e.filename} ({e.strerror}): give this user read and write access to {folder}; "
              "checkpoints are complete or absent: then rerun with --resume_from_checkpoint latest", file=sys.stderr)
        return 2
    named = re.search(r"No such file or directory: (?:'([^'\n]+)'|\"([^\"\n]+)\"|(\S[^\n]*))", str(e))
    missing = isinstance(e, FileNotFoundError) and (e.filename or  # (a loader worker's: in its message)
                                                     next((g for g in (named.groups() if named else ()) if g), None))
    cache = args and cache_folder(args)
    # Removed in use: a shared cache cleaned, a network mount lost. (The output folder only once training began:
    # before, a file missing there is no folder removed.)
    gone = missing and next((d for d in (args.output_dir, cache)
                             if inside(missing, d) and not os.path.isdir(d) and (claimed or d == cache)), None)
    if gone:
        again = ("rerun the same command to start afresh" if gone == args.output_dir else
                 "rerun with --resume_from_checkpoint latest (the cache is built again)")
        print(f"error: {gone} disappeared during the run ({missing} is missing): {again}", file=sys.stderr)
        return 2
    if not isinstance(e, Exception):  # SystemExit (--help), GeneratorExit
        raise
    if "DataLoader worker" in str(e) and "/torch_" in str(e):  # a worker's shared memory file: /dev/shm full
        what = (f"a data loader process ran out of shared memory ({first_line(e)})", "raise /dev/shm "
                "(Docker: --shm-size 8g) or lower --dataloader_num_workers; then rerun")
    elif disk_full(e):
        what = f"the disk is full or read-only ({first_line(e)}{free_space(e, args)})", "make room and rerun"
    elif re.search(r"DataLoader worker \(pids?\b.*(is killed by signal|exited unexpectedly)", str(e)):
        what = (f"a data loader process ended ({first_line(e)})", "if memory ran out, lower "
                "--dataloader_num_workers (or --train_batch_size); then rerun")
        if "Bus error" in str(e):  # torch's own words: workers out of shared memory
            what = (f"a data loader process ran out of shared memory ({first_line(e)})", "raise /dev/shm "
                    "(Docker: --shm-size 8g) or lower --dataloader_num_workers; then rerun")
    elif re.search(r"gloo.*(Connection reset by peer|Connection closed by peer)|NCCL.*remote process exited",
                   str(e)):  # (torchrun prints which process failed, and its error, too)
        what = (f"another process of this run stopped ({first_line(e)})", "its error, above, says why; if it was "
                "killed (out of memory, say), rerun")
    else:
        raise
    print(f"error: {what[0]}; checkpoints are complete or absent: {what[1]} with --resume_from_checkpoint "
          "latest", file=sys.stderr)
    return 2


def smaller_step(args):
    """What shrinks a training step's memory among the settings not yet in effect (each resumable)."""
    add = [f"--{flag}" for flag in ("gradient_checkpointing", "cache_latents") if not getattr(args, flag)]
    if (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")) == "no":
        add.append("--mixed_precision bf16")
    ways = (["lower --train_batch_size (raise --gradient_accumulation_steps to keep the batch)"]
            if args.train_batch_size > 1 else []) + (["add " + ", ".join(add)] if add else [])
    return ", or ".join(ways) or "the step does not fit at batch 1 with checkpointing: lower --resolution"


DISK_FULL = ("No space left on device", "Disk quota exceeded", "Read-only file system", "File too large",
             "os error 28)", "os error 122)", "os error 30)", "os error 27)",  # safetensors' (Rust's) wording
             "PytorchStreamWriter failed", "unexpected pos")  # torch.save's zip writer


def free_space(e, args):
    """Where a full disk is, to add to its message: the file that failed, when the error names it, and the room
    left on the output and cache folders' disks (safetensors' and torch.save's errors name no file)."""
    folders = [args.output_dir, cache_folder(args)] if args else []
    said, devices = [f"writing {e.filename}"] if getattr(e, "filename", None) else [], set()
    for folder in map(os.path.abspath, folders):
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)  # (the cache folder not made yet: the disk it would be on)
        try:
            device, stat = os.stat(folder).st_dev, os.statvfs(folder)
        except OSError:
            continue
        if device not in devices:
            devices.add(device)
            said.append(f"{stat.f_bavail * stat.f_frsize / 2**20:.0f} MB free for {folder}")
    return "".join(f"; {x}" for x in said)


def disk_full(e):
    """An error from writing to a full (or quota-limited, read-only, size-limited) disk, as an OSError or in
    the words of the library that wrote."""
    codes = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}  # (Windows: no EDQUOT)
    if isinstance(e, OSError) and e.errno in codes:
        return True
    return any(words in str(e) for words in DISK_FULL)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where a shell set Ctrl-C to be ignored)
        signal.signal(signal.SIGINT, on_stop)
    try:
        code = main()
    finally:  # a stop request while Python exits (after a bug's traceback too): ends it, without one of its own
        for stop in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(stop) is on_stop:
                signal.signal(stop, signal.SIG_DFL)
    sys.exit(code)
