#!/usr/bin/env python
"""Does the debiased weighting help? Train one model four ways, then measure its x₀-error at each timestep.

    python scripts/compare_weightings.py --out compare-out            # tiny offline model, CPU, a few minutes

The claim under test (arXiv:2310.08442): with constant weight, the ε-loss is SNR(t) × the x₀-error, so training
barely cares about x₀-errors at high t (low SNR); weighting the ε-loss by 1/√SNR fixes that. So this script

1. trains the same model on the same data, with the same seed and steps, through the real trainer
   (train_sdxl_debias.py, in a subprocess) with --loss_weighting constant, min_snr (γ = 5), debias, and
   debias --normalize_loss_weights;
2. noises held-out images at fixed timesteps spread over [0, T) with fixed noise (the same for every model),
   runs each UNet, converts its prediction to x̂₀ and ε̂, and averages ‖x̂₀ − x₀‖² and ‖ε̂ − ε‖² (latent space,
   mean per element) per timestep bucket; the untrained base model is a reference row;
3. writes OUT/results.md (the table), OUT/results.json (every number) and OUT/x0_error_by_t.png (if matplotlib
   is installed).

By default everything is built offline into OUT: a tiny random SDXL-architecture model (scripts/make_tiny_sdxl.py)
and two coloured-shape datasets (scripts/make_shapes_dataset.py, different seeds for training and held-out).
The tiny model's random VAE gives latents with std ≈ 0.03 instead of SDXL's ≈ 1, which would put every timestep
in the "mostly noise" regime; so the built model's VAE scaling factor is recalibrated to give unit-std latents on
the training images, the way SDXL's own 0.13025 was chosen. The UNet is fully fine-tuned by default: a LoRA on
a random tiny UNet learns too little in 600 steps to separate the weightings (mean ε-error 1.05 → 0.96, against
0.28 for a full fine-tune). The default size takes about 3 minutes on 2 CPU cores.
On a GPU, `--model stabilityai/stable-diffusion-xl-base-1.0 --dataset ... --heldout ... --resolution 1024`
runs the same comparison on real SDXL (add trainer flags with --train_args). The evaluation encodes with the
base model's text encoders and VAE, so leave them frozen (no --train_text_encoder).
"""
import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (row label, trainer flags). Same order in the table, the JSON and the plot.
WEIGHTINGS = {
    "constant": ("constant", ["--loss_weighting", "constant"]),
    "min_snr": ("min_snr (γ = 5)", ["--loss_weighting", "min_snr", "--snr_gamma", "5"]),
    "debias": ("debias", ["--loss_weighting", "debias"]),
    "debias_normalized": ("debias + normalize", ["--loss_weighting", "debias", "--normalize_loss_weights"]),
}
BASE = ("base", "base (untrained)")
TINY_SETTING = dict(steps=4, num_images=8, num_heldout=4, timesteps_per_bucket=1, train_batch_size=4)


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--out", default="compare-out", help="Output folder: built fixtures, trained runs, results (compare-out).")
    a("--model", default="tiny", help="'tiny' (default: built offline in OUT), or an SDXL folder or Hub id.")
    a("--dataset", default=None, help="Training data, as the trainer's --dataset. Default: shapes built in OUT.")
    a("--heldout", default=None, help="Evaluation images, same layouts. Default: shapes drawn with another seed.")
    a("--num_images", type=int, default=64, help="Size of the built training set (64).")
    a("--num_heldout", type=int, default=32, help="Held-out images evaluated, a fixed subset if there are more (32).")
    a("--resolution", type=int, default=64, help="Training and evaluation size (64).")
    a("--finetune", choices=("full", "lora"), default="full", help="full (default) or lora.")
    a("--steps", type=int, default=600, help="Optimizer steps per weighting (600).")
    a("--train_batch_size", type=int, default=16, help="(16)")
    a("--learning_rate", type=float, default=1e-3, help="(1e-3)")
    a("--seed", type=int, default=0, help="Trainer seed (data order, noise, timesteps) and evaluation noise (0).")
    a("--prediction_type", choices=("epsilon", "v_prediction", "sample"), default=None,
      help="Passed to the trainer and used to read the predictions. Default: the model scheduler's.")
    a("--train_args", default="",
      help="More trainer flags as one string, e.g. --train_args='--mixed_precision bf16 --gradient_checkpointing'.")
    a("--jobs", type=int, default=None,
      help="Trainer runs at a time. Default: 1 with a GPU; on CPU, cores / --cpu_threads, at most 4.")
    a("--cpu_threads", type=int, default=None,
      help="Torch threads per trainer run and for the evaluation, on CPU. Default: half the cores, at least 1.")
    a("--buckets", type=int, default=10, help="Timestep buckets over [0, T), the table's columns (10).")
    a("--timesteps_per_bucket", type=int, default=3, help="Evenly spaced timesteps evaluated per bucket (3).")
    a("--eval_batch_size", type=int, default=32, help="(32)")
    a("--eval_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
      help="UNet and text encoders at evaluation; the VAE always encodes in float32 (float32).")
    a("--tiny", action="store_true",
      help="Smoke-test defaults: " + ", ".join(f"--{k} {v}" for k, v in TINY_SETTING.items()) + ".")
    args = p.parse_args(argv)
    if args.tiny:  # smaller defaults; flags given explicitly still win
        p.set_defaults(**TINY_SETTING)
        args = p.parse_args(argv)
    # Half the cores: on a busy 2-core machine a 2-thread torch process stalls (a tiny UNet's forward went from
    # 34 ms to 1.3 s with one other process running); parallel single-thread runs use the cores instead.
    cores = os.cpu_count() or 1
    args.cpu_threads = args.cpu_threads or max(1, cores // 2)
    if args.jobs is None:
        args.jobs = 1 if torch.cuda.is_available() else max(1, min(len(WEIGHTINGS), cores // args.cpu_threads))
    return args


# ----------------------------------------------------------------------------------------------------------------
# fixtures: model and data (only built when --model / --dataset / --heldout do not name existing ones)
# ----------------------------------------------------------------------------------------------------------------

def run_script(name, *argv):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, argv)], check=True,
                   stdout=subprocess.DEVNULL)


def prepare_data(args):
    """Paths of the training and held-out data, building the shapes datasets when none is given."""
    train, heldout = args.dataset, args.heldout
    if train is None:
        train = os.path.join(args.out, "data", f"shapes-{args.num_images}")
        if not os.path.exists(os.path.join(train, "train", "metadata.jsonl")):
            run_script("make_shapes_dataset.py", train, "--num_images", args.num_images, "--seed", 0)
    if heldout is None:
        heldout = os.path.join(args.out, "data", f"heldout-{args.num_heldout}")
        if not os.path.exists(os.path.join(heldout, "train", "metadata.jsonl")):
            run_script("make_shapes_dataset.py", heldout, "--num_images", args.num_heldout, "--seed", 1)
    return train, heldout


def prepare_model(args, train_data):
    """args.model itself, unless it is 'tiny': then build the tiny SDXL in OUT (once) and calibrate its VAE.
    (A folder named tiny in the current directory is ./tiny.)"""
    if args.model != "tiny":
        return args.model
    folder = os.path.join(args.out, "model", f"tiny-sdxl-{args.resolution}px")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run_script("make_tiny_sdxl.py", tmp, "--seed", 0)
        calibrate_vae(tmp, train_data, args)
        os.replace(tmp, folder)  # complete or absent, like the trainer's checkpoints
    return folder


def calibrate_vae(folder, train_data, args):
    """Set the VAE's scaling_factor so that the training latents have unit std, as SDXL's 0.13025 does for
    its VAE. Without it the random VAE's latents (std ≈ 0.03) are 1000× below the noise schedule's signal level,
    and even t = 0 would look like high-noise t to the model."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    pixels = torch.stack([img["pixels"] for img in load_images(train_data, args.resolution, limit=256, seed=0)])
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(16)])
    std = latents.std().item()
    path = os.path.join(folder, "vae", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["scaling_factor"] = 1.0 / std
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def load_images(source, resolution, limit, seed):
    """Up to `limit` rows of a dataset (any layout the trainer reads), center-cropped, unflipped: a list of
    {pixels, caption, time_ids} with SDXL's size conditioning, exactly as the trainer builds it."""
    import train_sdxl_debias as T

    table, _ = T.load_table(T.parse_args(["--dataset", source, "--max_train_samples", str(limit), "--seed", str(seed)]))
    items = []
    for row in table:
        pixels, original_size, crop = T.transform_image(T.open_image(row["image"]), (resolution, resolution),
                                                        True, False, random.Random(0))
        caption = row["text"][0] if isinstance(row["text"], (list, tuple)) else row["text"]
        time_ids = T.time_ids(original_size, crop, (resolution, resolution))
        items.append({"pixels": pixels, "caption": caption or "", "time_ids": time_ids})
    return items


# ----------------------------------------------------------------------------------------------------------------
# training: the real trainer, one subprocess per weighting
# ----------------------------------------------------------------------------------------------------------------

def train_command(args, model, train_data, name):
    cmd = [sys.executable, os.path.join(ROOT, "train_sdxl_debias.py"),
           "--pretrained_model_name_or_path", model, "--dataset", train_data,
           "--output_dir", os.path.join(args.out, "runs", name), "--overwrite_output_dir",
           "--finetune", args.finetune, "--resolution", args.resolution,
           "--center_crop",  # no random crops or flips: the held-out images are center-cropped the same way
           "--train_batch_size", args.train_batch_size, "--max_train_steps", args.steps,
           "--learning_rate", args.learning_rate, "--seed", args.seed,
           "--checkpointing_steps", args.steps, "--logging_steps", max(1, args.steps // 20), "--report_to", "none",
           *WEIGHTINGS[name][1]]
    if args.prediction_type:
        cmd += ["--prediction_type", args.prediction_type]
    return [str(c) for c in cmd] + shlex.split(args.train_args)


def train_one(args, model, train_data, name, env):
    """One trainer run, or the finished run of the same command if OUT has one; returns its seconds."""
    cmd = train_command(args, model, train_data, name)
    out = os.path.join(args.out, "runs", name)
    done = os.path.join(out, "compare_weightings.json")
    if os.path.exists(done):
        with open(done) as f:
            record = json.load(f)
        if record["command"] == cmd[1:]:
            print(f"[train] {name}: reusing the finished run in {out}", flush=True)
            return record["seconds"]
    print(f"[train] {name}: {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    with open(os.path.join(args.out, "runs", f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the trainer failed for {name} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for entry in os.listdir(out):  # the final checkpoint duplicates the weights (and, full, adds Adam state)
        if entry.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(out, entry))
    with open(done, "w") as f:
        json.dump({"command": cmd[1:], "seconds": seconds}, f, indent=1)
    print(f"[train] {name}: {seconds:.0f} s", flush=True)
    return seconds


def train_all(args, model, train_data):
    """Train every weighting, `--jobs` at a time; returns seconds per run. Every run gets the same thread
    count, seed and flags, so the weighting is the only difference between them."""
    env = os.environ.copy()
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(args.cpu_threads))  # a user's own setting wins
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(train_one, args, model, train_data, name, env) for name in WEIGHTINGS}
        try:
            return {name: f.result() for name, f in futures.items()}
        except RuntimeError as e:
            sys.exit(str(e))


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------

def eval_timesteps(num_train_timesteps, buckets, per_bucket):
    """`per_bucket` evenly spaced timesteps in each of `buckets` equal slices of [0, T): (edges, timesteps)."""
    edges = [round(b * num_train_timesteps / buckets) for b in range(buckets + 1)]
    steps = []
    for lo, hi in zip(edges, edges[1:]):
        steps += sorted({lo + (2 * j + 1) * (hi - lo) // (2 * per_bucket) for j in range(per_bucket)})
    return edges, steps


@torch.no_grad()
def encode_heldout(args, model, heldout, device, dtype):
    """Held-out latents (fp32) and text conditioning, encoded once with the base model's frozen parts (the
    trainer never changes them), plus the noise scheduler's ᾱ and prediction type."""
    import train_sdxl_debias as T
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    items = load_images(heldout, args.resolution, limit=args.num_heldout, seed=0)  # same images whatever --seed
    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [cls.from_pretrained(model, subfolder=sub, torch_dtype=dtype).to(device) for cls, sub in
                ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device)  # fp32: SDXL's VAE overflows in fp16
    latents, embeds, pooled = [], [], []
    for i in range(0, len(items), args.eval_batch_size):
        chunk = items[i:i + args.eval_batch_size]
        latents.append(T.encode_latents(vae, torch.stack([c["pixels"] for c in chunk]).to(device), torch.float32))
        e, p = T.encode_prompt(encoders, tokenizers, [c["caption"] for c in chunk])
        embeds.append(e)
        pooled.append(p)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return {"x0": torch.cat(latents), "embeds": torch.cat(embeds), "pooled": torch.cat(pooled),
            "time_ids": torch.stack([c["time_ids"] for c in items]).to(device, dtype),
            "alphas_cumprod": sched.alphas_cumprod.double(), "num_train_timesteps": sched.config.num_train_timesteps,
            "prediction_type": args.prediction_type or sched.config.prediction_type}


def to_x0_eps(pred, noisy, alpha, sigma, prediction_type):
    """The prediction as (x̂₀, ε̂), from x_t = α x₀ + σ ε and v = α ε − σ x₀."""
    if prediction_type == "epsilon":
        return (noisy - sigma * pred) / alpha, pred
    if prediction_type == "v_prediction":
        return alpha * noisy - sigma * pred, sigma * noisy + alpha * pred
    return pred, (noisy - alpha * pred) / sigma


@torch.no_grad()
def evaluate_unet(unet, data, timesteps, args, device, dtype):
    """Mean per-element x₀- and ε-errors at each timestep, over the held-out images. The noise at timestep t is
    drawn from a generator seeded with (seed, t), so every model sees exactly the same noisy inputs."""
    x0_errors, eps_errors = [], []
    for t in timesteps:
        abar = data["alphas_cumprod"][t]
        alpha, sigma = abar.sqrt().item(), (1 - abar).sqrt().item()
        noise = torch.randn(data["x0"].shape, generator=torch.Generator().manual_seed(args.seed * 100_003 + t))
        x0_err = eps_err = 0.0
        for i in range(0, len(noise), args.eval_batch_size):
            sl = slice(i, i + args.eval_batch_size)
            x0, eps = data["x0"][sl], noise[sl].to(device)
            noisy = alpha * x0 + sigma * eps
            cond = {"text_embeds": data["pooled"][sl], "time_ids": data["time_ids"][sl]}
            tt = torch.full((len(x0),), t, device=device)
            pred = unet(noisy.to(dtype), tt, data["embeds"][sl], added_cond_kwargs=cond).sample.float()
            x0_hat, eps_hat = to_x0_eps(pred, noisy, alpha, sigma, data["prediction_type"])
            x0_err += (x0_hat - x0).pow(2).flatten(1).mean(1).sum().item()
            eps_err += (eps_hat - eps).pow(2).flatten(1).mean(1).sum().item()
        x0_errors.append(x0_err / len(noise))
        eps_errors.append(eps_err / len(noise))
    return x0_errors, eps_errors


def load_unet(args, model, name, device, dtype):
    """The base UNet (name None), a full fine-tune's UNet, or the base UNet with a run's LoRA loaded."""
    from diffusers import UNet2DConditionModel

    out = os.path.join(args.out, "runs", name) if name else None
    if out and args.finetune == "full":
        unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        if out:
            unet.load_lora_adapter(out, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    return unet.to(device).eval()


def evaluate_all(args, model, heldout):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    dtype = getattr(torch, args.eval_dtype)
    data = encode_heldout(args, model, heldout, device, dtype)
    edges, timesteps = eval_timesteps(data["num_train_timesteps"], args.buckets, args.timesteps_per_bucket)
    results = {}
    for key, name in [(BASE[0], None)] + [(n, n) for n in WEIGHTINGS]:
        print(f"[eval] {key}", flush=True)
        unet = load_unet(args, model, name, device, dtype)
        x0_errors, eps_errors = evaluate_unet(unet, data, timesteps, args, device, dtype)
        results[key] = summarize(x0_errors, eps_errors, timesteps, edges)
        del unet
    snr = [(data["alphas_cumprod"][t] / (1 - data["alphas_cumprod"][t])).item() for t in timesteps]
    reference = {"x0_mean_square": data["x0"].pow(2).mean().item(), "x0_std": data["x0"].std().item(),
                 "num_heldout": len(data["x0"]), "prediction_type": data["prediction_type"]}
    return {"timesteps": timesteps, "snr": snr, "bucket_edges": edges, "models": results, "reference": reference}


def summarize(x0_errors, eps_errors, timesteps, edges):
    def by_bucket(values):
        return [sum(v for v, t in zip(values, timesteps) if lo <= t < hi) /
                sum(1 for t in timesteps if lo <= t < hi) for lo, hi in zip(edges, edges[1:])]

    return {"x0_error_by_t": x0_errors, "eps_error_by_t": eps_errors, "x0_error_by_bucket": by_bucket(x0_errors),
            "eps_error_by_bucket": by_bucket(eps_errors), "x0_error_mean": sum(x0_errors) / len(x0_errors),
            "eps_error_mean": sum(eps_errors) / len(eps_errors)}


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------

def labels():
    return {BASE[0]: BASE[1], **{k: v[0] for k, v in WEIGHTINGS.items()}}


def markdown_table(results):
    """Rows: base + weightings. Columns: x₀-error per timestep bucket, then the mean ε-error over all t."""
    edges = results["bucket_edges"]
    head = ["weighting"] + [f"t {lo}–{hi - 1}" for lo, hi in zip(edges, edges[1:])] + ["ε-error (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in labels().items():
        r = results["models"][key]
        cells = [label] + [f"{v:.3g}" for v in r["x0_error_by_bucket"]] + [f"{r['eps_error_mean']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path, results, command):
    ref = results["reference"]
    text = (f"# x₀-error by timestep\n\n"
            f"Mean per-element ‖x̂₀ − x₀‖² in latent space on {ref['num_heldout']} held-out images, averaged per "
            f"timestep bucket (columns); last column: ‖ε̂ − ε‖² averaged over every evaluated t (uniform in t: what "
            f"constant weighting minimizes). Predicting x̂₀ = 0 would score {ref['x0_mean_square']:.3g} "
            f"(latent std {ref['x0_std']:.3g}).\n\n{markdown_table(results)}\n\nCommand: `{command}`\n")
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plot(path, results):
    """x₀-error against t (log scale) and each model's ratio to constant; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = results["timesteps"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    constant = results["models"]["constant"]["x0_error_by_t"]
    for i, (key, label) in enumerate(labels().items()):
        errors = results["models"][key]["x0_error_by_t"]
        top.plot(t, errors, marker=".", color=f"C{i}", label=label)
        if key != BASE[0]:  # same colour per model in both panels
            bottom.plot(t, [e / c for e, c in zip(errors, constant)], marker=".", color=f"C{i}", label=label)
    top.axhline(results["reference"]["x0_mean_square"], color="grey", ls="--", lw=0.8, label="x̂₀ = 0")
    top.set(yscale="log", ylabel="x₀-error (latent MSE)", title="x₀-error on held-out images")
    bottom.set(xlabel="timestep t", ylabel="x₀-error / constant's")
    bottom.axhline(1.0, color="grey", lw=0.8)
    top.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def absolute_paths(args):
    """Local paths made absolute, so the trainer subprocesses and this script agree on them. Hub ids (and the
    word 'tiny') are left as they are."""
    args.out = os.path.abspath(args.out)
    for name in ("model", "dataset", "heldout"):
        value = getattr(args, name)
        if value and value != "tiny" and os.path.exists(value):
            setattr(args, name, os.path.abspath(value))


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = shlex.join(["python", "scripts/compare_weightings.py", *(sys.argv[1:] if argv is None else argv)])
    absolute_paths(args)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    train_data, heldout = prepare_data(args)
    model = prepare_model(args, train_data)
    seconds = train_all(args, model, train_data)
    results = evaluate_all(args, model, heldout)
    results.update(train_seconds=seconds, total_seconds=time.perf_counter() - start,
                   config=dict(vars(args)), model=model, dataset=train_data, heldout=heldout)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=True)
    print(write_markdown(os.path.join(args.out, "results.md"), results, command))
    if write_plot(os.path.join(args.out, "x0_error_by_t.png"), results):
        print(f"plot: {os.path.join(args.out, 'x0_error_by_t.png')}")
    print(f"done in {results['total_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
