"""scripts/compare_weightings.py at smoke-test size: four trainer runs, an evaluation, a well-formed table."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "compare_weightings.py")
_spec = importlib.util.spec_from_file_location("compare_weightings", SCRIPT)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)

ROWS = ["base (untrained)", "constant", "min_snr (γ = 5)", "debias", "debias + normalize"]


def numbers(value):
    """Every int/float inside a JSON value."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_exact_prediction_converts_back_to_x0_and_noise(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    abar = torch.tensor(0.0047, dtype=torch.float64)  # SDXL's t = 999: the conversion's worst conditioning
    alpha, sigma = abar.sqrt().item(), (1 - abar).sqrt().item()
    noisy = alpha * x0 + sigma * eps
    pred = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    x0_hat, eps_hat = cw.to_x0_eps(pred, noisy, alpha, sigma, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_eval_timesteps_cover_every_bucket():
    edges, steps = cw.eval_timesteps(1000, 10, 3)
    assert edges == list(range(0, 1001, 100))
    assert len(steps) == 30 and steps[:3] == [16, 50, 83] and steps[-1] == 983


def test_compare_weightings_tiny_run_writes_a_full_finite_table(tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny",
                           "--out", str(out), "--buckets", "4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["base", "constant", "min_snr", "debias", "debias_normalized"]
    assert results["bucket_edges"] == [0, 250, 500, 750, 1000]
    for r in results["models"].values():
        assert len(r["x0_error_by_bucket"]) == len(r["eps_error_by_bucket"]) == 4
        assert len(r["x0_error_by_t"]) == len(results["timesteps"]) == 4  # --tiny: one timestep per bucket
    values = list(numbers(results))
    assert values and all(math.isfinite(v) for v in values)
    # training changed the model: each trained row differs from the base row
    base = results["models"]["base"]["x0_error_by_t"]
    assert all(results["models"][k]["x0_error_by_t"] != base for k in results["models"] if k != "base")

    assert (out / "x0_error_by_t.png").exists() == (importlib.util.find_spec("matplotlib") is not None)

    lines = (out / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["weighting", "t 0–249", "t 250–499", "t 500–749", "t 750–999", "ε-error (mean)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in rows] == ROWS
    assert all(len(r) == len(header) and all(math.isfinite(float(c)) for c in r[1:]) for r in rows)


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cw.write_plot(str(tmp_path / "plot.png"), {}) is False
    assert not (tmp_path / "plot.png").exists()
