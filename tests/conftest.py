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
