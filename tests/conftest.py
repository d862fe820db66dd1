"""Session fixtures: a tiny SDXL pipeline and a shapes dataset, built offline once per test session."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Everything offline: the Hub is never contacted, datasets' cache lives in a temp folder (set per session below).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest -n 2 runs two test workers side by side on CI's 2 cores: each torch process then takes one thread, since
# two processes each spinning two OpenMP threads on 2 cores ran several times slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # diffusers' Euler scheduler trips numpy 2's copy-keyword deprecation on every pipeline call: noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    os.environ["HF_DATASETS_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_sdxl"))
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_sdxl.py"), out], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shapes_dataset.py"), out,
                    "--num_images", "24"], check=True, capture_output=True)
    return out


def run_trainer(*args, check=True, timeout=600):
    """Run train_sdxl_debias.py in a fresh process, as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sdxl_debias.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def model_files(tiny_model, tmp_path_factory):
    """Single-file checkpoints, as A1111/ComfyUI/kohya users hold them: the tiny SDXL in the original layout
    (tiny.safetensors, fp32: the same weights as its folder), its VAE alone (vae.safetensors), the model marked
    v-prediction with zero terminal SNR (vpred.safetensors), and files that are no SDXL base: a LoRA, an SD 1.x
    checkpoint, a diffusers UNet, a download cut short, a diffusers VAE's weights without their folder."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    import train_sdxl_debias as T

    out = str(tmp_path_factory.mktemp("model_files"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    state = T.sdxl_checkpoint(pipe, torch.float32)
    save_file(state, os.path.join(out, "tiny.safetensors"))
    prefix = "first_stage_model."  # its VAE alone, as sdxl_vae.safetensors is stored; and in diffusers' names
    save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, os.path.join(out, "vae.safetensors"))
    save_file(pipe.vae.state_dict(), os.path.join(out, "diffusion_pytorch_model.safetensors"))
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, os.path.join(out, "vpred.safetensors"))
    unet = "model.diffusion_model.out.2.weight"
    for name, keys in (("lora", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]),
                       ("sd15", [unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]),
                       ("unet", ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"])):
        save_file({k: torch.zeros(2, 2) for k in keys}, os.path.join(out, f"{name}.safetensors"))
    torch.save({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
               os.path.join(out, "sd15.ckpt"))  # a pickle: not looked into before diffusers loads it
    open(os.path.join(out, "model.sft"), "wb").close()  # safetensors under the other extension
    os.makedirs(os.path.join(out, "sd15-pipeline"))  # a diffusers folder of another pipeline
    with open(os.path.join(out, "sd15-pipeline", "model_index.json"), "w") as f:
        f.write('{"_class_name": "StableDiffusionPipeline"}')
    with open(tiny := os.path.join(out, "tiny.safetensors"), "rb") as f, \
            open(os.path.join(out, "broken.safetensors"), "wb") as cut:  # a download cut short
        cut.write(f.read(os.path.getsize(tiny) // 2))
    return out
