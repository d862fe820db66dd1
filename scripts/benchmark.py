#!/usr/bin/env python
"""Training-step speed and memory of train_sdxl_debias.py, measured through the trainer's own step code.

    python scripts/benchmark.py --size tiny --steps 5                        # CPU smoke run, seconds
    python scripts/benchmark.py --size full --finetune lora,full --batch_size 1,4 --precision bf16

What one step is: the inner loop of `train_sdxl_debias.train()`, from its own functions: `training_step`
(noise, UNet forward, debiased loss), `accelerator.backward`, then `update_weights` (grad clipping, the
non-finite guard, `optimizer.step()`, EMA, the lr schedule, `zero_grad`), after `make_optimization` built the
optimizer and ran `accelerator.prepare` with this precision. The models are built in-process with random weights
(same speed and memory as real ones) and set up by the trainer's `prepare_models` (LoRA, placement and dtypes,
gradient checkpointing, EMA) and `compile_blocks`. Flags are parsed by the trainer's `parse_args` and
checked by its `validate`, so the defaults (LoRA rank, loss weighting, AdamW settings, grad-norm limit) are the
trainer's; any flag this script doesn't define goes to the trainer as is (`--rank 16 --use_dora`, `--use_ema`,
`--loss_weighting min_snr`, `--train_text_encoder` with `--with_encoders text`). LoRA-only flags apply to the
`lora` configurations of a cross product.

Batches are synthetic. `--with_encoders` chooses what each step encodes, i.e. which cache the run has:
  none  latents and text embeddings come cached (`--cache_latents`): the UNet step alone (default)
  vae   text embeddings cached, the VAE encodes pixels every step (the trainer's default)
  text  latents cached, both CLIP encoders run every step (`--cache_latents --no_text_cache`)
  all   nothing cached: VAE and text encoders every step (`--no_text_cache`)

Comma lists (`--finetune lora,full --batch_size 1,4 --gradient_checkpointing off,on`) run the cross product.
Each configuration prints one JSON line: its settings and
  ms_per_step     median of the --steps timed optimizer steps (CUDA events on a GPU, perf_counter on the CPU)
  ms_steps        each timed step, in order: a slow first step (graphs recorded late) reads differently from a
                  slow step every N (a sync, the allocator); ms_per_step_wall_mean is their wall-clock mean
  gc_ms_steps     the host's garbage-collection pauses in each of those steps (a full collection after a
                  compile can take a second)
  gc_full_ms      one full collection run after the timed steps: the pause a step takes whenever Python decides
                  on one (the trainer's HeapFreezer keeps the models' and compiler's objects out of it)
  img_per_s       batch size x accumulation / ms_per_step (`--gradient_accumulation_steps N`, passed through to the
                  trainer, makes a step N micro-batches, as the trainer does)
  peak_mem_gib    torch.cuda.max_memory_allocated on a GPU (weights, optimizer state, activations); on the CPU
                  the process's peak RSS (libraries included). `mem_kind` says which.
  tflop_per_step  torch.utils.flop_counter over one eager forward + backward; with gradient checkpointing the
                  recomputed forward counts too, so `mfu` there is hardware, not model, FLOP utilisation. The
                  CPU's attention kernel is not in the counter's table: CPU figures miss attention FLOPs.
  mfu             (tflop_per_step / step time) / --peak_tflops; null on the CPU
  setup_s         building the models, the optimizer and the FLOP-counting pass (the first, cold one)
  warmup_s        the --warmup steps after that (torch.compile's compilation lands here)
  compiled_graphs, graph_breaks  --compile only: what dynamo compiled of the blocks
  profile, device_busy  with --profile N: kernel (CPU: aten op) time per step by kind (compiled, attention,
                  conv, gemm, optimizer, norm, copy, other), kernels (ops) per step, the top 10; on CUDA memcpy and
                  memset count as kernels. device_busy = kernel time / step time: under 1 when the GPU waits for
                  the host (over 1 only if streams overlap)
  host_syncs_per_step, sync_sites  CUDA only: over 10 more steps in torch's sync debug mode, how often the host
                  waited for the GPU, and at which lines (the trainer's intent: once per --max_nonfinite_steps)
A configuration that fails (out of memory, a missing package) prints a line with `error` and the run goes on.
A human-readable table comes last.

Sizes: `tiny` is the UNet of scripts/make_tiny_sdxl.py (64² images by default); `full` has SDXL-base's shapes
(2.567 B UNet parameters, 1024² by default: the published SDXL-base config). Nothing is downloaded.
"""
import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import make_tiny_sdxl  # noqa: E402  (the tiny architecture: one definition for the fixtures and this script)
import train_sdxl_debias as T  # noqa: E402

# bf16 dense matmul throughput measured on the H100 the reference numbers come from (a large bf16 matmul loop).
H100_BF16_PEAK_TFLOPS = 798.0
ENCODER_MODES = ("none", "vae", "text", "all")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CHOICES = ("off", "on", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# SDXL-base 1.0's published shapes.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SDXL_TEXT_ENCODERS = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         hidden_act="quick_gelu"),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
         projection_dim=1280))
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025)
# SDXL's training noise schedule (the scheduler/ folder of the base model, read by the trainer as DDPM).
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                prediction_type="epsilon")


# ----------------------------------------------------------------------------------------------------------------
# options and configurations
# ----------------------------------------------------------------------------------------------------------------

def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--size", choices=("tiny", "full"), default="tiny")
    a("--finetune", default="lora", help="lora, full, or both: lora,full")
    a("--batch_size", default="1", help="Comma list, e.g. 1,4.")
    a("--resolution", default=None, help="Comma list of image sizes (default: 1024 full, 64 tiny).")
    a("--gradient_checkpointing", nargs="?", const="on", default="off", help="Bare flag = on; or off,on.")
    a("--compile", nargs="?", const="on", default="off",
      help="The trainer's --compile (regional torch.compile). Bare flag = on; or a comma list of off, on and "
           "compile modes (= --compile --compile_mode M): off,on,reduce-overhead.")
    a("--compile_scope", default="blocks",
      help="The trainer's --compile_scope: blocks (each transformer and resnet block), transformers (each "
           "Transformer2DModel whole), stages (each down/mid/up block), or a comma list.")
    a("--channels_last", nargs="?", const="on", default="off", help="The trainer's --channels_last: on, or off,on.")
    a("--cudnn_benchmark", nargs="?", const="on", default="off",
      help="torch.backends.cudnn.benchmark (cuDNN times its convolution algorithms per shape): on, or off,on.")
    a("--sdpa_backend", default="auto",
      help="The trainer's --sdpa_backend (the attention kernel tried first): auto, flash, cudnn, efficient, math, "
           "or a comma list: auto,cudnn.")
    a("--with_encoders", nargs="?", const="all", default="none",
      help="What each step encodes: none (all cached), vae, text, all (nothing cached). Bare flag = all.")
    a("--optimizer", default="adamw", help="Comma list of the trainer's optimizers.")
    a("--precision", default=None, help="fp32, bf16, fp16 or a comma list (default: bf16 on CUDA, fp32 on CPU).")
    a("--steps", type=int, default=10, help="Timed steps per configuration.")
    a("--warmup", type=int, default=2, help="Untimed steps first (compilation, allocator, cuDNN autotuning).")
    a("--peak_tflops", type=float, default=None,
      help=f"Peak TFLOP/s for the MFU column (default on CUDA: {H100_BF16_PEAK_TFLOPS}, the H100 bf16 matmul "
           "peak measured with a large matmul loop; none on the CPU).")
    a("--device", default=None, help="Default: cuda if available, else cpu.")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's). On a busy CPU, 1 thread is far steadier than several.")
    a("--profile", type=int, default=0, metavar="N",
      help="After timing, run N more steps under torch.profiler: the JSON line gets `profile` (where the time "
           "goes: kernel time per step by kind, launches, the top kernels) and `device_busy`.")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="Also append the JSON lines to this file.")
    opts, opts.trainer_flags = p.parse_known_args(argv)  # the rest is the trainer's to parse (and reject)
    opts.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.device.type == "cuda" and opts.device.index not in (None, 0):  # accelerate would use cuda:0 anyway
        p.error(f"--device {opts.device}: pick the card with CUDA_VISIBLE_DEVICES={opts.device.index} instead")
    if opts.peak_tflops is None and opts.device.type == "cuda":
        opts.peak_tflops = H100_BF16_PEAK_TFLOPS
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.steps < 1 or opts.warmup < 0 or opts.profile < 0:
        p.error("--steps must be at least 1, --warmup and --profile at least 0")
    return opts


def split(value, name, choices=None, kind=str):
    """A comma-list option as a list, checked against `choices` (or positive integers with kind=int)."""
    try:
        items = [kind(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or (choices and any(v not in choices for v in items)) or (kind is int and min(items) < 1):
        expected = ", ".join(choices) if choices else "positive integers"
        raise SystemExit(f"error: --{name} {value!r}: expected a comma list of {expected}")
    return items


def configurations(opts):
    """The cross product of every comma-list option, as a list of plain dicts (the JSON `config` fields)."""
    on_off = {"off": False, "on": True}
    default_precision = "bf16" if opts.device.type == "cuda" else "fp32"
    default_resolution = 1024 if opts.size == "full" else 64
    axes = dict(
        finetune=split(opts.finetune, "finetune", ("lora", "full")),
        batch_size=split(opts.batch_size, "batch_size", kind=int),
        resolution=split(opts.resolution or default_resolution, "resolution", kind=int),
        gradient_checkpointing=[on_off[v] for v in split(opts.gradient_checkpointing, "gradient_checkpointing",
                                                         on_off)],
        compile=[{"off": None, "on": "default"}.get(v, v) for v in split(opts.compile, "compile", COMPILE_CHOICES)],
        compile_scope=split(opts.compile_scope, "compile_scope", ("blocks", "transformers", "stages")),
        channels_last=[on_off[v] for v in split(opts.channels_last, "channels_last", on_off)],
        cudnn_benchmark=[on_off[v] for v in split(opts.cudnn_benchmark, "cudnn_benchmark", on_off)],
        sdpa_backend=split(opts.sdpa_backend, "sdpa_backend", ("auto", "flash", "cudnn", "efficient", "math")),
        optimizer=split(opts.optimizer, "optimizer"),
        precision=split(opts.precision or default_precision, "precision", DTYPES),
        encoders=split(opts.with_encoders, "with_encoders", ENCODER_MODES))
    if any(r % 8 for r in axes["resolution"]):
        raise SystemExit("error: --resolution must be a multiple of 8 (the VAE downsamples by 8)")
    configs = [dict(size=opts.size, **dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    for cfg in configs:  # JSON: compile true/false, and its mode
        cfg["compile_mode"] = cfg["compile"] or "default"
        cfg["compile"] = cfg["compile"] is not None
    # Scopes only differ compiled: one eager row, not one per scope.
    return [c for c in configs if c["compile"] or c["compile_scope"] == axes["compile_scope"][0]]


def trainer_args(cfg, opts):
    """The trainer's own argument namespace for this configuration: the pass-through flags, then ours (which
    win: argparse keeps the last value), the trainer's defaults for everything else."""
    argv = [*opts.trainer_flags, "--finetune", cfg["finetune"], "--train_batch_size", str(cfg["batch_size"]),
            "--resolution", str(cfg["resolution"]), "--optimizer", cfg["optimizer"], "--seed", str(opts.seed),
            "--mixed_precision", {"fp32": "no"}.get(cfg["precision"], cfg["precision"]),
            "--sdpa_backend", cfg["sdpa_backend"]]
    argv += ["--gradient_checkpointing"] * cfg["gradient_checkpointing"] + ["--channels_last"] * cfg["channels_last"]
    argv += ["--compile", "--compile_mode", cfg["compile_mode"], "--compile_scope", cfg["compile_scope"]] \
        if cfg["compile"] else []
    args = T.parse_args(argv)
    if cfg["finetune"] == "full":
        args.lora_flags_given = []  # `--finetune lora,full --rank 16`: the rank is for the lora rows only
    return args


def check_args(args, cfg):
    """The trainer's own flag checks (combinations, optional packages), then ours. Its validate() wants data and
    an output folder: give it an empty temporary one of each."""
    with tempfile.TemporaryDirectory() as tmp:
        T.validate(argparse.Namespace(**{**vars(args), "dataset": None, "train_data_dir": tmp,
                                         "output_dir": os.path.join(tmp, "out")}))
    if getattr(args, "train_text_encoder", False) and cfg["encoders"] not in ("text", "all"):
        raise T.UserError("--train_text_encoder needs the text encoders to run: --with_encoders text or all")


# ----------------------------------------------------------------------------------------------------------------
# models: built with random weights, then set up the way load_models() sets up loaded ones
# ----------------------------------------------------------------------------------------------------------------

def build_parts(cfg, device, seed):
    """Random-weight UNet, plus the encoders this configuration runs each step, constructed on `device`.
    Returns (unet, vae or None, text_encoders, tokenizers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    enc = cfg["encoders"]
    if cfg["size"] == "tiny" and enc != "none":
        with tempfile.TemporaryDirectory() as tmp:  # the tiny tokenizer is written to files, then loaded
            pipe = make_tiny_sdxl.build_pipeline(tmp, seed)
        text = ([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
        return pipe.unet, pipe.vae if enc in ("vae", "all") else None, *(text if enc in ("text", "all") else ([], []))
    unet_config = make_tiny_sdxl.tiny_unet_config() if cfg["size"] == "tiny" else SDXL_UNET
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = full_vae() if enc in ("vae", "all") else None
        text_encoders, tokenizers = full_text_encoders() if enc in ("text", "all") else ([], [])
    return unet, vae, text_encoders, tokenizers


def full_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**SDXL_VAE)


def full_text_encoders():
    """SDXL's two CLIP text encoders. The tokenizer is the tiny one (SDXL's can't be downloaded here): prompts
    are padded to 77 tokens either way, so the encoders do the same work."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tiny_sdxl.build_tokenizer(tmp)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    one = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODERS[0], **ids))
    two = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODERS[1], **ids))
    return [one, two], [tok, tok]


def prepare_models(parts, args, device, weight_dtype):
    """The trainer's own set-up of loaded models (T.prepare_models), on these random-weight ones. --compile is
    applied later (see run_config), after the FLOP count, which needs eager modules."""
    from diffusers import DDPMScheduler

    unet, vae, text_encoders, tokenizers = parts
    eager = argparse.Namespace(**{**vars(args), "compile": False})
    return T.prepare_models(eager, tokenizers, text_encoders, vae, unet, DDPMScheduler(**SCHEDULE), device,
                            weight_dtype)


def synthetic_batch(cfg, m, seed, pin):
    """A batch as the trainer's loader yields it (CPU tensors, pinned on CUDA hosts): cached latents and/or
    prompt embeddings in the weight dtype, else pixels in [-1, 1] and captions; SDXL's six size numbers."""
    g = torch.Generator().manual_seed(seed)
    b, res, unet = cfg["batch_size"], cfg["resolution"], m.unet.config
    captions = [f"a photo of a {c} circle on a {d} background"
                for c, d in itertools.islice(itertools.cycle([("red", "blue"), ("green", "white")]), b)]
    batch = {"captions": captions,
             "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(b, 1)}
    if cfg["encoders"] in ("none", "text"):
        batch["latents"] = torch.randn(b, unet.in_channels, res // 8, res // 8, generator=g).to(m.weight_dtype)
    else:
        batch["pixel_values"] = torch.rand(b, 3, res, res, generator=g) * 2 - 1
    if cfg["encoders"] in ("none", "vae"):
        pooled_dim = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        batch["prompt_embeds"] = torch.randn(b, 77, unet.cross_attention_dim, generator=g).to(m.weight_dtype)
        batch["pooled_prompt_embeds"] = torch.randn(b, pooled_dim, generator=g).to(m.weight_dtype)
    return {k: v.pin_memory() if pin and torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------

class Trainer:
    """T.train()'s inner loop for one configuration, from the trainer's own pieces: an Accelerator of this
    precision, T.make_optimization (parameter groups, optimizer, lr schedule, accelerator.prepare, which also
    puts the trained models' forward under autocast), then per step T.training_step, accelerator.backward,
    MetricsLog.add and T.update_weights (clip, the non-finite guard, optimizer and EMA step, schedule, zero_grad),
    and T.HeapFreezer after each step. Left out: the data loader (the batch is already in pinned host
    memory), log rows, checkpoints."""

    def __init__(self, m, args, batch, device):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)  # one process, a new precision per configuration
        GradientState._reset_state()
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
        self.m, self.args, self.batch = m, args, batch
        self.params, self.optimizer, self.lr_scheduler = T.make_optimization(args, m, self.accelerator, 10**6)
        self.metrics = T.MetricsLog(os.devnull, m.noise_scheduler.config.num_train_timesteps)
        self.guard = T.NonFiniteGuard(args, self.accelerator, self.optimizer)
        self.generator = torch.Generator(device)
        self.heap = T.HeapFreezer()

    def forward_backward(self, step, micro=0):
        accum = self.args.gradient_accumulation_steps
        self.generator.manual_seed(T.derive_seed(self.args.seed, "noise", 0, step, micro))
        loss, stats = T.training_step(self.batch, self.m, self.args, self.generator, new_step=micro == 0)
        self.accelerator.backward(loss / accum)
        return stats

    def step(self, step):
        """One optimizer step: --gradient_accumulation_steps micro-batches (the trainer's default, 1), then the
        update. With CUDA graphs, the later micro-batches add to gradients the first left in the graphs' pool."""
        for micro in range(self.args.gradient_accumulation_steps):
            self.metrics.add(self.forward_backward(step, micro))
        T.update_weights(self.accelerator, self.args, self.m, self.params, self.optimizer, self.lr_scheduler,
                         self.metrics, self.guard, step)
        self.heap.after_step()

    def finish(self):
        """The last step's non-finite verdict, which the trainer reads before its next log row."""
        self.guard.settle()

    def count_tflop(self):
        """FLOPs of one forward + backward (matmuls, convolutions, GPU attention kernels), counted in eager
        mode; the optimizer's elementwise work is not counted. Gradients are discarded, weights untouched."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.forward_backward(-1)
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 1e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GcPauses:
    """Milliseconds Python's garbage collector paused the host, per step. Compiling leaves hundreds of thousands
    of objects behind (775 k after compiling the tiny UNet), and one full collection of them then takes 0.3-1 s
    on this project's CPU: a stall the GPU sees once its queue runs dry."""

    def __init__(self):
        self.current, self.started = 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.current += (time.perf_counter() - self.started) * 1e3

    def take(self):
        ms, self.current = self.current, 0.0
        return ms


def time_steps(trainer, first, n, device):
    """Per-step milliseconds of steps first..first+n-1, the wall-clock mean over all of them, and each step's
    garbage-collection pauses. CUDA events time each step on the GPU without a host sync in between (the trainer
    doesn't sync either)."""
    pauses, gc_ms = GcPauses(), []
    gc.callbacks.append(pauses)
    sync(device)
    start = time.perf_counter()
    try:
        if device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for k, (begin, end) in enumerate(events):
                begin.record()
                trainer.step(first + k)
                end.record()
                gc_ms.append(pauses.take())
            sync(device)
            per_step = [begin.elapsed_time(end) for begin, end in events]
        else:
            per_step = []
            for k in range(n):
                t = time.perf_counter()
                trainer.step(first + k)
                per_step.append((time.perf_counter() - t) * 1e3)
                gc_ms.append(pauses.take())
    finally:
        gc.callbacks.remove(pauses)
    return per_step, (time.perf_counter() - start) * 1e3 / n, gc_ms


def full_collection_ms():
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


SYNC_STEPS = 10  # steps run in CUDA's sync debug mode after the timed ones


def count_host_syncs(trainer, first, n, device):
    """Host syncs per step on CUDA, and where they happen (torch's sync debug mode warns at each one). The
    trainer means to make one per --max_nonfinite_steps steps: the guard's batched read of its flags."""
    if device.type != "cuda":
        return None, None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for k in range(n):
                trainer.step(first + k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return len(sites) / n, sorted(set(sites))


KINDS = (  # kernel (CUDA) or aten op (CPU) names -> kind; the first match wins
    ("compiled", r"^triton_"),  # inductor's fused kernels, named after the ops they fused: before those ops
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv", r"conv|implicit_gemm|fprop|dgrad|wgrad|winograd|nchwtonhwc|nhwctonchw"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm|linear)$"),
    ("optimizer", r"adam|foreach|multi_tensor"),  # with gradient clipping's foreach norm: before "norm"
    ("norm", r"norm"),
    ("copy", r"copy|memcpy|memset|cast|convert|transpose|aten::cat$|catarray|contiguous|clone|index"))


def profile_steps(trainer, first, n, device):
    """Where a step's time goes, from torch.profiler over n steps. On CUDA: kernel time per step by kind, kernel
    launches per step (calls_per_step), the top kernels. On the CPU the same for aten ops and their own time."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for k in range(n):
            trainer.step(first + k)
        sync(device)
    per_name = {}  # name -> [microseconds, calls]
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            # (a user annotation on the GPU, such as "Optimizer.step#AdamW.step", spans kernels counted anyway)
            us = e.time_range.elapsed_us()
        elif not cuda and e.name.startswith("aten::"):
            us = e.self_cpu_time_total
        else:
            continue
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    by_kind = {}
    for name, (us, _) in per_name.items():
        kind = next((k for k, pattern in KINDS if re.search(pattern, name.lower())), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + us / n / 1e3
    top = sorted(per_name.items(), key=lambda item: -item[1][0])[:10]
    return dict(
        unit="kernels" if cuda else "aten ops (self CPU time)",
        ms_per_step=sum(us for us, _ in per_name.values()) / n / 1e3,
        calls_per_step=sum(calls for _, calls in per_name.values()) / n,
        by_kind_ms={k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        top=[[name[:90], round(us / n / 1e3, 3), calls / n] for name, (us, calls) in top])


def reset_peak_memory(device):
    """Start a fresh peak; returns what peak_memory will measure. On Linux, writing 5 to clear_refs resets the
    process's peak RSS (VmHWM); elsewhere the CPU figure is the process's peak since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "process_peak_rss"
    except OSError:
        return "process_max_rss_since_start"


def peak_memory(device, kind):
    """GiB of the peak since reset_peak_memory."""
    if kind == "cuda_max_memory_allocated":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if kind == "process_peak_rss":
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_config(cfg, opts):
    """Build, warm up and time one configuration; returns its result fields."""
    device, args = opts.device, trainer_args(cfg, opts)
    check_args(args, cfg)
    weight_dtype = DTYPES[cfg["precision"]]
    t0 = time.perf_counter()
    m = prepare_models(build_parts(cfg, device, opts.seed), args, device, weight_dtype)
    for model in [m.unet] + (m.text_encoders if args.train_text_encoder else []):
        model.train()
    trainer = Trainer(m, args, synthetic_batch(cfg, m, opts.seed, pin=device.type == "cuda"), device)
    mem_kind = reset_peak_memory(device)  # weights, optimizer state, activations; not the fp32 construction
    model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    accum = args.gradient_accumulation_steps
    tflop = trainer.count_tflop() * accum  # before compiling: the counter sees eager ops only
    if args.compile:
        from torch._dynamo.utils import counters
        counters.clear()
        T.compile_blocks(m.unet, args.compile_mode, scope=args.compile_scope)
    setup_s = time.perf_counter() - t0

    sync(device)
    t0 = time.perf_counter()
    for k in range(opts.warmup):
        trainer.step(k)
    sync(device)
    warmup_s = time.perf_counter() - t0
    per_step, wall_ms, gc_ms = time_steps(trainer, opts.warmup, opts.steps, device)
    gc_full_ms = full_collection_ms()
    trainer.finish()
    peak_gib = peak_memory(device, mem_kind)
    syncs, sync_sites = count_host_syncs(trainer, opts.warmup + opts.steps, SYNC_STEPS, device)
    graphs = compile_stats() if args.compile else {}
    extra = {}
    if opts.profile:
        try:
            extra["profile"] = profile_steps(trainer, opts.warmup + opts.steps + SYNC_STEPS, opts.profile, device)
        except Exception as e:  # the profiler is a diagnostic: its failure must not cost the timings
            extra["profile"] = {"error": f"{type(e).__name__}: {T.first_line(e)}"}

    ms = statistics.median(per_step)
    achieved = tflop / (ms / 1e3)
    if "ms_per_step" in extra.get("profile", {}) and device.type == "cuda":
        extra["device_busy"] = extra["profile"]["ms_per_step"] / ms  # under 1: the GPU waits for the host
    return dict(
        rank=args.rank if args.finetune == "lora" else None, loss_weighting=args.loss_weighting,
        trainable_params_m=sum(p.numel() for p in trainer.params) / 1e6,
        unet_params_m=sum(p.numel() for p in m.unet.parameters()) / 1e6,
        ms_per_step=ms, ms_per_step_min=min(per_step), ms_per_step_wall_mean=wall_ms,
        ms_steps=[round(t, 1) for t in per_step], gc_ms_steps=[round(t, 1) for t in gc_ms], gc_full_ms=gc_full_ms,
        img_per_s=cfg["batch_size"] * accum / (ms / 1e3), peak_mem_gib=peak_gib, mem_kind=mem_kind,
        model_mem_gib=model_gib, tflop_per_step=tflop, tflop_per_s=achieved, accumulation=accum,
        mfu=achieved / opts.peak_tflops if opts.peak_tflops else None, warmup_s=warmup_s, setup_s=setup_s,
        host_syncs_per_step=syncs, sync_sites=sync_sites, **graphs, **extra)


def compile_stats():
    """What dynamo made of the compiled blocks: graphs compiled, and graph breaks (each one splits a block back
    into eager pieces)."""
    from torch._dynamo.utils import counters
    return dict(compiled_graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()))


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def free_memory(device, compiled):
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold on to their modules
    gc.unfreeze()  # (T.HeapFreezer's: a model in a reference cycle would otherwise outlive its configuration)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rounded(row):
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}


def run_all(opts):
    """Every configuration in turn; a failure becomes a row with `error` and the next one runs."""
    import diffusers

    common = dict(device=device_name(opts.device), torch=torch.__version__, diffusers=diffusers.__version__,
                  steps=opts.steps, warmup=opts.warmup, peak_tflops=opts.peak_tflops)
    if opts.device.type == "cpu":  # CPU timings depend on threads and on whatever else the machine runs
        common["threads"] = torch.get_num_threads()
    configs = configurations(opts)
    for cfg in configs:
        trainer_args(cfg, opts)  # a flag the trainer rejects (e.g. an unknown optimizer) stops us here, not later
    rows = []
    for cfg in configs:
        if opts.device.type == "cpu":
            common["load_avg_1m"] = os.getloadavg()[0]
        torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
        T.prefer_sdpa_backend(cfg["sdpa_backend"])  # what the trainer's setup() does
        try:
            result = run_config(cfg, opts)
        except Exception as e:  # OOM, a missing optional package, a compile failure: report it, go on
            result = {"error": f"{type(e).__name__}: {T.first_line(e)}"}
        free_memory(opts.device, cfg["compile"])
        row = rounded({**cfg, **common, **result})
        line = json.dumps(row)
        print(line, flush=True)
        if opts.out:
            with open(opts.out, "a") as f:
                f.write(line + "\n")
        rows.append(row)
    return rows


COLUMNS = (  # (JSON field, table heading, format)
    ("finetune", "tune", "{}"), ("batch_size", "bs", "{}"), ("resolution", "res", "{}"),
    ("gradient_checkpointing", "ckpt", "{:d}"), ("compiled", "compile", "{}"), ("compile_scope", "scope", "{}"),
    ("channels_last", "nhwc", "{:d}"),
    ("cudnn_benchmark", "cudnn", "{:d}"), ("sdpa_backend", "sdpa", "{}"),
    ("optimizer", "optim", "{}"),
    ("precision", "prec", "{}"), ("encoders", "encode", "{}"), ("ms_per_step", "ms/step", "{:.1f}"),
    ("img_per_s", "img/s", "{:.2f}"), ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("tflop_per_step", "TFLOP/step", "{:.4g}"), ("mfu", "MFU", "{:.1%}"), ("warmup_s", "warmup s", "{:.1f}"),
    ("host_syncs_per_step", "syncs/step", "{:.2f}"), ("device_busy", "GPU busy", "{:.0%}"))


def print_table(rows):
    head = [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        row = {**row, "compiled": row["compile_mode"] if row["compile"] else "off",  # off, default, reduce-overhead
               "compile_scope": row.get("compile_scope") if row["compile"] else None}
        cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        body.append(cells + ([row["error"][:80]] if "error" in row else []))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    mem_kind = next((r["mem_kind"] for r in rows if "mem_kind" in r), "n/a")
    print(f"\n{rows[0]['device']}, torch {rows[0]['torch']}, diffusers {rows[0]['diffusers']}; "
          f"peak memory = {mem_kind}")
    for cells in [head] + body:
        error = cells[len(widths):]  # an error message trails its row, unpadded
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)) + "".join("  " + c for c in error))


def main(argv=None):
    opts = parse_options(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers import logging as transformers_logging
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        rows = run_all(opts)
    except T.UserError as e:  # a flag the trainer rejects: its one-line message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows)
    return 1 if all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
