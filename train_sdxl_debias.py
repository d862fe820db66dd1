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
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

import loss as debias_loss

logger = logging.getLogger("train_sdxl_debias")


class UserError(Exception):
    """A problem the user can fix (a path, a column, a flag). Reported as one line, no traceback."""


def derive_seed(*parts):
    """A 63-bit seed that is a pure function of `parts` (seed, epoch, step, ...): resumable, worker-independent."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# 1. arguments
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", default="stabilityai/stable-diffusion-xl-base-1.0",
      help="Hub id or local folder of an SDXL pipeline.")
    a("--pretrained_vae_model_name_or_path", default=None,
      help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix (then it may run in fp16).")
    a("--revision", default=None)
    a("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    # data
    a("--dataset", "--dataset_name", dest="dataset", default=None,
      help="Hub dataset id, or a local folder (imagefolder with metadata.jsonl/csv, or images + same-name .txt).")
    a("--dataset_config_name", default=None)
    a("--train_data_dir", default=None, help="Local folder of training images (same layouts as --dataset).")
    a("--image_column", default=None, help="Default: the first of image, img, images, file_name, path.")
    a("--caption_column", default=None, help="Default: the first of text, caption(s), prompt(s), description.")
    a("--max_train_samples", type=int, default=None, help="Train on a seeded random subset of this size.")
    a("--resolution", type=int, default=1024)
    a("--center_crop", action="store_true", help="Center crop (default: random crop).")
    a("--random_flip", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    # what to train
    a("--finetune", choices=("lora", "full"), default="lora")
    a("--rank", type=int, default=None, help="LoRA rank (default 4).")
    a("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    # loss
    a("--loss_weighting", choices=debias_loss.WEIGHTINGS, default="debias")
    a("--snr_gamma", type=float, default=5.0, help="γ of --loss_weighting min_snr.")
    a("--prediction_type", choices=debias_loss.PREDICTION_TYPES, default=None,
      help="Default: the scheduler's (epsilon for SDXL base).")
    a("--normalize_loss_weights", action="store_true",
      help="Divide the weights by their mean over the training timesteps, so the loss (and lr, clipping) keep "
           "plain MSE's scale. SDXL's mean ε-debias weight is ≈ 3.0.")
    a("--noise_offset", type=float, default=0.0)
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
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
      help="Default: accelerate config's choice.")
    a("--optimizer", choices=("adamw", "adamw8bit", "adafactor", "prodigy"), default="adamw",
      help="adamw8bit needs bitsandbytes, prodigy needs prodigyopt (use --learning_rate 1 with it).")
    a("--gradient_checkpointing", action="store_true")
    a("--compile", action="store_true",
      help="torch.compile the UNet's repeated blocks (transformer and resnet blocks), not the whole UNet: "
           "the same speed-up for a fraction of the warm-up.")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
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
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, default=500)
    a("--validation_inference_steps", type=int, default=25)
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    args = p.parse_args(argv)
    args.rank_given = args.rank is not None  # --rank with --finetune full is a mistake worth reporting
    args.rank = 4 if args.rank is None else args.rank
    args.lora_alpha = args.rank if args.lora_alpha is None else args.lora_alpha
    return args


def validate(args):
    """Fail fast, before any model loads, with one line that names the problem and what to do."""
    if not args.dataset and not args.train_data_dir:
        raise UserError("no training data: pass --dataset <hub id or folder> or --train_data_dir <folder>")
    if args.dataset and args.train_data_dir:
        raise UserError("pass either --dataset or --train_data_dir, not both")
    if args.train_data_dir and not os.path.isdir(args.train_data_dir):
        raise UserError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if args.finetune == "full" and args.rank_given:
        raise UserError("--rank only applies to --finetune lora; drop it for a full fine-tune")
    for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps", "logging_steps", "rank", "num_validation_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.snr_gamma <= 0:
        raise UserError("--snr_gamma must be positive")
    resume = args.resume_from_checkpoint
    if resume and resume != "latest" and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} does not exist; pass a checkpoint folder or 'latest'")
    if not resume and not args.overwrite_output_dir and list_checkpoints(args.output_dir):
        raise UserError(f"{args.output_dir} holds checkpoints of another run: pass --resume_from_checkpoint latest "
                        "to continue it, --overwrite_output_dir to start afresh, or another --output_dir")
    import importlib.util
    package = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(args.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--optimizer {args.optimizer} needs the {package} package: pip install {package}")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set")


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


def load_part(cls, args, subfolder, path=None, **kw):
    """from_pretrained with our revision/variant, turning 'not found / offline' into a UserError."""
    path = path or args.pretrained_model_name_or_path
    try:
        if subfolder.startswith("tokenizer"):
            return cls.from_pretrained(path, subfolder=subfolder, revision=args.revision, **kw)
        return cls.from_pretrained(path, subfolder=subfolder, revision=args.revision, variant=args.variant, **kw)
    except (OSError, ValueError) as e:
        where = f"{path}/{subfolder}" if subfolder else path
        raise UserError(f"cannot load {cls.__name__} from {where!r}: check the model id or folder "
                        f"(and that the Hub is reachable, or the model is cached): {first_line(e)}") from None


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_models(args, accelerator):
    """Tokenizers, both text encoders, VAE, UNet and the DDPM noise scheduler; frozen parts in weight_dtype."""
    import transformers
    transformers.logging.set_verbosity_error()  # silence "torchvision not installed" notices on import
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = [load_part(AutoTokenizer, args, s, use_fast=True) for s in ("tokenizer", "tokenizer_2")]
    for tok, sub in zip(tokenizers, ("tokenizer", "tokenizer_2")):
        if len(tok) < 1000 and tok.model_max_length > 1000:  # transformers' silent failure without vocab files
            raise UserError(f"{args.pretrained_model_name_or_path}/{sub} has no usable tokenizer files")
    text_encoders = [load_part(CLIPTextModel, args, "text_encoder"),
                     load_part(CLIPTextModelWithProjection, args, "text_encoder_2")]
    vae_path = args.pretrained_vae_model_name_or_path
    vae = load_part(AutoencoderKL, args, "" if vae_path else "vae", path=vae_path)
    unet = load_part(UNet2DConditionModel, args, "unet")
    noise_scheduler = load_part(DDPMScheduler, args, "scheduler")
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    for m in text_encoders + [vae, unet]:
        m.requires_grad_(False)
    for te in text_encoders:
        place(te, device, weight_dtype)
    # SDXL's own VAE overflows in fp16; keep it fp32 unless the user supplied a (fixed) VAE of their choice.
    place(vae, device, weight_dtype if vae_path else torch.float32)
    if args.finetune == "lora":
        place(unet, device, weight_dtype)
        add_lora(unet, args)
    else:
        place(unet, device, torch.float32)  # trained weights stay fp32; autocast does the mixed precision
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        compile_blocks(unet)
    loss_scale = 1.0
    if args.normalize_loss_weights:
        loss_scale = 1.0 / debias_loss.mean_weight(noise_scheduler.alphas_cumprod, args.loss_weighting,
                                                   noise_scheduler.config.prediction_type, args.snr_gamma).item()
    return Models(tokenizers, text_encoders, vae, unet, noise_scheduler, weight_dtype, loss_scale)


def place(module, device, dtype):
    from diffusers.utils import logging as diffusers_logging

    module.to(device)
    if next(module.parameters()).dtype != dtype:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its "modules to keep in float32: []" notice on every cast
        module.to(dtype=dtype)
        diffusers_logging.set_verbosity(level)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(unet, args):
    """peft LoRA on the attention projections; the LoRA parameters are kept in fp32 under mixed precision."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def compile_blocks(unet):
    """Regional compilation: each transformer/resnet block is compiled once per distinct shape and reused,
    instead of tracing the whole UNet (which took 322 s to warm up on an H100)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    for module in unet.modules():
        if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
            module.compile()


def build_optimizer(args, params, device):
    """AdamW (fused on CUDA), 8-bit AdamW, Adafactor or Prodigy (validate() checked the optional packages)."""
    betas, eps, wd, lr = (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay, args.learning_rate
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=device.type == "cuda")
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    import prodigyopt
    return prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=wd)


def build_pipeline(args, m, unet, for_saving=False):
    """`unet` with the base model's other parts and inference scheduler, as a StableDiffusionXLPipeline.

    For validation it reuses the loaded (possibly half-precision) frozen parts. For saving it reloads them as
    stored, so a full fine-tune's output keeps the base model's precision everywhere but the trained UNet."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    if for_saving:
        parts = {}
        if args.pretrained_vae_model_name_or_path:  # the output carries the VAE it was trained with
            parts["vae"] = load_part(AutoencoderKL, args, "", path=args.pretrained_vae_model_name_or_path)
    else:
        parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1],
                     tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1])
    return StableDiffusionXLPipeline.from_pretrained(args.pretrained_model_name_or_path, unet=unet,
                                                     revision=args.revision, variant=args.variant, **parts)


# ----------------------------------------------------------------------------------------------------------------
# 3. data
# ----------------------------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("image", "img", "images", "image_path", "file_name", "path")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "prompts", "description", "sentence")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_table(args):
    """The training table (a `datasets.Dataset`) with an image column (undecoded) and a caption column.

    Sources: a Hub dataset id; a local imagefolder (images + metadata.jsonl/csv/parquet); a local folder of
    images with same-name .txt captions (kohya's layout). Images are decoded later, in the loader workers.
    """
    import datasets

    source = args.train_data_dir or args.dataset
    if os.path.isdir(source):
        if not any(os.path.exists(os.path.join(r, m)) for r, _, _ in os.walk(source) for m in METADATA_FILES) \
                and find_txt_captions(source):
            table = datasets.Dataset.from_dict(find_txt_captions(source))
        else:
            table = guarded_load(datasets.load_dataset, "imagefolder", data_dir=source)
    elif os.path.exists(source) or source.startswith((".", "/", "~")):
        raise UserError(f"dataset folder {source!r} does not exist")
    else:
        table = guarded_load(datasets.load_dataset, source, args.dataset_config_name)
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise UserError(f"dataset {source!r} has no 'train' split (it has: {', '.join(table)})")
        table = table["train"]
    image_col = pick_column(table.column_names, args.image_column, IMAGE_COLUMNS, "image")
    caption_col = pick_column(table.column_names, args.caption_column, CAPTION_COLUMNS, "caption")
    if isinstance(table.features[image_col], datasets.Image):
        table = table.cast_column(image_col, datasets.Image(decode=False))
    table = table.select_columns([image_col, caption_col]).rename_columns({image_col: "image", caption_col: "text"})
    if len(table) == 0:
        raise UserError(f"dataset {source!r} has no rows")
    if args.max_train_samples:
        table = table.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(table))))
    return table, source


def guarded_load(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:  # datasets raises many types for "not found / offline / bad files"
        name = a[0] if a[0] != "imagefolder" else kw.get("data_dir")
        raise UserError(f"cannot load dataset {name!r}: {first_line(e)} (check the id or folder; "
                        "offline, only local folders and cached datasets load)") from None


def find_txt_captions(folder):
    """kohya layout: every image with a same-name .txt next to it. Returns columns, or None if there are none."""
    images, texts = [], []
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS:
                txt = os.path.join(root, stem + ".txt")
                images.append(os.path.join(root, f))
                texts.append(open(txt, encoding="utf-8", errors="replace").read().strip() if os.path.exists(txt) else "")
    return {"image": images, "text": texts} if any(texts) else None


def pick_column(columns, requested, candidates, kind):
    if requested:
        if requested not in columns:
            raise UserError(f"--{kind}_column {requested!r} is not in the dataset; its columns are: {', '.join(columns)}")
        return requested
    for c in candidates:
        if c in columns:
            return c
    raise UserError(f"no {kind} column found among: {', '.join(columns)}; name it with --{kind}_column")


def open_image(value):
    """PIL image from a datasets Image value ({'bytes', 'path'}), a path, or a PIL image; upright, RGB."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    img = value if isinstance(value, Image.Image) else Image.open(value)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # transparent pixels become white, not black
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def transform_image(img, resolution, center_crop, random_flip, rng):
    """Resize the short side to `resolution`, crop a square, maybe flip; returns pixels in [-1, 1] and the
    SDXL size conditioning: original (h, w) and crop top-left (top, left) in the resized image."""
    w, h = img.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (rh - resolution) // 2, (rw - resolution) // 2
    else:
        top, left = rng.randint(0, rh - resolution), rng.randint(0, rw - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - left - resolution  # the crop's left edge, as seen in the flipped image
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (h, w), (top, left)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes and transforms one row. Indexed by (row, sample_seed) so random crop, flip and caption choice are
    a pure function of (seed, epoch, row): identical across workers, processes and restarts."""

    def __init__(self, table, args):
        self.table, self.args = table, args

    def __len__(self):
        return len(self.table)

    def __getitem__(self, key):
        i, sample_seed = key
        row = self.table[int(i)]
        rng = random.Random(sample_seed)
        try:
            img = open_image(row["image"])
            img.load()
        except Exception as e:  # unreadable or truncated file: this sample is skipped, the run goes on
            logger.warning("skipping unreadable image %s: %s", describe_image(row["image"]), first_line(e))
            return None
        pixels, original_size, crop = transform_image(img, self.args.resolution, self.args.center_crop,
                                                      self.args.random_flip, rng)
        caption = row["text"]
        if isinstance(caption, (list, tuple)):
            caption = rng.choice(caption) if caption else ""
        return {"pixel_values": pixels, "caption": caption or "",
                "time_ids": torch.tensor([*original_size, *crop, self.args.resolution, self.args.resolution],
                                         dtype=torch.float32)}


def describe_image(value):
    if isinstance(value, dict):
        return value.get("path") or "<embedded image bytes>"
    return str(value)


def collate(samples):
    """Stack a batch; samples that failed to decode (None) are dropped, an all-failed batch becomes None."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "time_ids": torch.stack([s["time_ids"] for s in samples])}


class BatchSampler:
    """Seeded, rank-aware, resumable batches. Each epoch: shuffle with (seed, epoch), cut into full batches,
    deal them round-robin to the ranks, keep a whole number of optimizer steps per rank. `set_epoch(e, skip)`
    starts epoch e after `skip` batches, without loading them."""

    def __init__(self, num_items, batch_size, seed, num_replicas=1, rank=0, multiple_of=1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank, self.multiple_of = num_replicas, rank, multiple_of
        self.epoch, self.skip = 0, 0

    def __len__(self):
        per_rank = self.num_items // self.batch_size // self.num_replicas
        return per_rank // self.multiple_of * self.multiple_of

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.num_items, generator=g).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        mine = batches[self.rank::self.num_replicas][:len(self)]
        for batch in mine[self.skip:]:
            yield [(i, derive_seed(self.seed, "sample", self.epoch, i)) for i in batch]


# ----------------------------------------------------------------------------------------------------------------
# 4. conditioning
# ----------------------------------------------------------------------------------------------------------------

def encode_prompt(text_encoders, tokenizers, captions):
    """SDXL's text conditioning: penultimate hidden states of both encoders, concatenated on the feature axis
    ([B, 77, 768 + 1280] for SDXL), and the pooled, projected output of the second encoder ([B, 1280])."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
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
# 5. cache — latents and text embeddings on disk (not built yet: every step encodes; see the README's roadmap)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# 6. step
# ----------------------------------------------------------------------------------------------------------------

def training_step(batch, m, args, generator):
    """One micro-batch: encode (unless cached), noise, predict, weighted loss.

    `batch` holds either pixel_values or cached `latents` (scaled, in weight_dtype), either captions or cached
    `prompt_embeds` + `pooled_prompt_embeds`, and `time_ids`. Returns (loss, per-sample stats, detached)."""
    device = generator.device
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            latents = encode_latents(m.vae, batch["pixel_values"].to(device, non_blocking=True), m.weight_dtype)
        if "prompt_embeds" in batch:
            prompt_embeds = batch["prompt_embeds"].to(device, non_blocking=True)
            pooled = batch["pooled_prompt_embeds"].to(device, non_blocking=True)
        else:
            prompt_embeds, pooled = encode_prompt(m.text_encoders, m.tokenizers, batch["captions"])
    latents = latents.float()  # noise, targets and the loss in fp32; autocast casts the UNet's inputs
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=generator,
                                                        device=device, dtype=latents.dtype)
    sched = m.noise_scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=generator, device=device)
    noisy = sched.add_noise(latents, noise, timesteps)
    prediction_type = sched.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(prediction_type)
    if target is None:
        target = sched.get_velocity(latents, noise, timesteps)
    added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, dtype=prompt_embeds.dtype)}
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


def register_checkpoint_hooks(accelerator, args):
    """Checkpoints hold only what trains: the LoRA in diffusers format (loadable as is), or the full UNet."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                export_trained(accelerator.unwrap_model(model), args, output_dir)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_trained(accelerator.unwrap_model(models.pop()), args, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def export_trained(unet, args, folder):
    if args.finetune == "lora":
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    else:
        unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)


def load_trained(unet, args, folder):
    if args.finetune == "lora":
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state, _ = StableDiffusionXLPipeline.lora_state_dict(folder)
        state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint {folder} does not match this LoRA (rank or targets differ)")
    else:
        from safetensors.torch import load_file

        path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        unet.load_state_dict(load_file(path))


def save_checkpoint(accelerator, args, global_step, epoch):
    """Write to a temporary folder, then rename: a kill at any moment leaves checkpoint-N complete or absent."""
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{global_step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every rank writes its RNG state; main writes weights/optimizer
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"global_step": global_step, "epoch": epoch}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            for _, old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def resume(accelerator, args):
    """Load the checkpoint named by --resume_from_checkpoint; returns the global step it was saved at."""
    path = args.resume_from_checkpoint
    if path == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.info("no checkpoint in %s: starting a new run", args.output_dir)
            return 0
        path = found[-1][1]
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise UserError(f"{path} is not a complete checkpoint of this trainer (no {STATE_FILE})")
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        step = json.load(f)["global_step"]
    logger.info("resumed from %s at step %d", path, step)
    return step


def save_final(accelerator, args, m):
    """LoRA: output_dir/pytorch_lora_weights.safetensors. Full: output_dir is a complete SDXL pipeline."""
    unet = accelerator.unwrap_model(m.unet)
    if args.finetune == "lora":
        export_trained(unet, args, args.output_dir)
    else:
        build_pipeline(args, m, unet, for_saving=True).save_pretrained(args.output_dir, safe_serialization=True)
    logger.info("saved the %s to %s", "LoRA" if args.finetune == "lora" else "pipeline", args.output_dir)


# ----------------------------------------------------------------------------------------------------------------
# 8. observe
# ----------------------------------------------------------------------------------------------------------------

def run_validation(accelerator, args, m, step, trackers):
    """Images for --validation_prompt with a fixed seed, saved as PNGs and sent to the trackers."""
    unet = accelerator.unwrap_model(m.unet)
    pipe = build_pipeline(args, m, unet)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast(), torch.no_grad():
        images = pipe(args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                      num_images_per_prompt=args.num_validation_images, generator=generator,
                      height=args.resolution, width=args.resolution).images
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        img.save(os.path.join(folder, f"step_{step:06d}_{i}.png"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"validation": [wandb.Image(i, caption=args.validation_prompt) for i in images]}, step=step)
    logger.info("validation images for step %d in %s", step, folder)
    return images


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


class MetricsLog:
    """Sums per-sample stats on the device between logs (no host sync per step); writes metrics.jsonl rows."""

    def __init__(self, path):
        self.path, self.sums, self.count, self.t0 = path, {}, 0, time.perf_counter()

    def add(self, stats):
        for k in ("loss", "mse"):
            self.sums[k] = self.sums.get(k, 0) + stats[k].sum()
        self.count += stats["loss"].numel()

    def flush(self, step, epoch, lr, grad_norm, accelerator):
        sums = torch.stack([self.sums.get("loss", torch.zeros(())), self.sums.get("mse", torch.zeros(())),
                            torch.tensor(float(self.count))]).to(accelerator.device)
        sums = accelerator.reduce(sums, reduction="sum")
        elapsed = time.perf_counter() - self.t0
        n = max(sums[2].item(), 1)
        row = {"step": step, "epoch": epoch, "loss": sums[0].item() / n, "mse": sums[1].item() / n, "lr": lr,
               "grad_norm": float(grad_norm), "samples_per_s": sums[2].item() / elapsed}
        if accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        return row


# ----------------------------------------------------------------------------------------------------------------
# 9. main
# ----------------------------------------------------------------------------------------------------------------

def setup(args):
    """Accelerator, logging, seeds. Multi-GPU via `accelerate launch`; several CPU processes via torchrun."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    trackers = resolve_trackers(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for _, old in list_checkpoints(args.output_dir):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return accelerator


def train(args):
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = setup(args)
    table, source = load_table(args)  # data errors surface before the (slow) model load
    m = load_models(args, accelerator)
    world, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    sampler = BatchSampler(len(table), args.train_batch_size, args.seed, world, rank, multiple_of=accum)
    if len(sampler) == 0:
        raise UserError(f"the dataset has {len(table)} images, fewer than one optimizer step needs "
                        f"(batch {args.train_batch_size} × accumulation {accum} × {world} processes)")
    loader = torch.utils.data.DataLoader(
        ImageCaptionDataset(table, args), batch_sampler=sampler, collate_fn=collate,
        num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False)
    steps_per_epoch = len(sampler) // accum
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    params = [p for p in m.unet.parameters() if p.requires_grad]
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * accum * world
    optimizer = build_optimizer(args, params, accelerator.device)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process, which shortens warmup and
    # decay with more GPUs. Here it steps once per optimizer step, whatever the process count or accumulation.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    m.unet, optimizer = accelerator.prepare(m.unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_checkpoint_hooks(accelerator, args)

    global_step = resume(accelerator, args) if args.resume_from_checkpoint else 0
    if accelerator.is_main_process:
        accelerator.init_trackers("train_sdxl_debias", config={k: v for k, v in vars(args).items()
                                                               if isinstance(v, (int, float, str, bool))})
    effective = args.train_batch_size * world * accum
    what = f"LoRA rank {args.rank}" if args.finetune == "lora" else "full UNet"
    logger.info("training %s of %s with %s loss (%s) on %s: %d images, %d epochs, %d steps, effective batch "
                "%d (%d per device × %d processes × %d accumulation)", what, args.pretrained_model_name_or_path,
                args.loss_weighting, m.noise_scheduler.config.prediction_type, source, len(table), num_epochs,
                max_steps, effective, args.train_batch_size, world, accum)

    metrics = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"))
    generator = torch.Generator(accelerator.device)
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    m.unet.train()
    grad_norm = torch.zeros(())
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        sampler.set_epoch(epoch, skip=(global_step % steps_per_epoch) * accum if epoch == global_step // steps_per_epoch else 0)
        for i, batch in enumerate(loader):
            micro = i % accum
            last_micro = micro == accum - 1
            # Noise and timesteps are a pure function of (seed, rank, step, micro-batch): a resumed run draws
            # exactly what the uninterrupted run drew.
            generator.manual_seed(derive_seed(args.seed, "noise", rank, global_step, micro))
            if batch is not None:
                with nullcontext() if last_micro else accelerator.no_sync(m.unet):
                    loss, stats = training_step(batch, m, args, generator)
                    accelerator.backward(loss / accum)
                metrics.add(stats)
            if not last_micro:
                continue
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == max_steps:
                row = metrics.flush(global_step, epoch, lr_scheduler.get_last_lr()[0], grad_norm, accelerator)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                save_checkpoint(accelerator, args, global_step, epoch)
            if args.validation_prompt and accelerator.is_main_process and (
                    global_step % args.validation_steps == 0 or global_step == max_steps):
                run_validation(accelerator, args, m, global_step, accelerator.trackers)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator, args, m)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.end_training()


def push_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                              exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="train_sdxl_debias",
                      ignore_patterns=["checkpoint-*", ".tmp-checkpoint-*", "logs"])
    except Exception as e:
        raise UserError(f"push to the Hub failed ({first_line(e)}); the outputs are safe in {args.output_dir}") from None
    logger.info("pushed %s to https://huggingface.co/%s", args.output_dir, repo_id)


def main(argv=None):
    args = parse_args(argv)
    try:
        validate(args)
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
