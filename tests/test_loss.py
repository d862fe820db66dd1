"""loss.py against independent formulas, its edge cases, and its reduction/dtype rules."""
import math
import os
import subprocess
import sys

import pytest
import torch

import loss
from loss import compute_snr, diffusion_loss, loss_weights

# Independent formulas, written per parameterisation directly from the weights' definitions (not via x0-weights).
EXPECTED = {
    ("debias", "epsilon"): lambda s: 1 / math.sqrt(s),
    ("debias", "v_prediction"): lambda s: math.sqrt(s) / (s + 1),
    ("debias", "sample"): lambda s: math.sqrt(s),
    ("min_snr", "epsilon"): lambda s, g=5.0: min(s, g) / s,
    ("min_snr", "v_prediction"): lambda s, g=5.0: min(s, g) / (s + 1),
    ("min_snr", "sample"): lambda s, g=5.0: min(s, g),
    ("constant", "epsilon"): lambda s: 1.0,
    ("constant", "v_prediction"): lambda s: 1.0,
    ("constant", "sample"): lambda s: 1.0,
}
SNRS = [1e-3, 3e-3, 0.0047, 0.1, 0.5, 1.0, 2.0, 4.99, 5.0, 5.01, 37.0, 500.0, 1000.0]


@pytest.mark.parametrize("weighting,prediction_type", sorted(EXPECTED))
def test_weights_match_independent_formulas(weighting, prediction_type):
    got = loss_weights(torch.tensor(SNRS), weighting, prediction_type, snr_gamma=5.0)
    assert got.dtype == torch.float32 and got.shape == (len(SNRS),)
    for s, w in zip(SNRS, got.tolist()):
        want = EXPECTED[weighting, prediction_type](s)
        assert abs(w - want) <= 1e-4 * abs(want), (s, w, want)


def test_min_snr_matches_diffusers_snr_gamma():
    """Our min_snr is diffusers' --snr_gamma weighting (train_text_to_image_sdxl.py), for ε and v."""
    snr = torch.tensor(SNRS)
    gamma = torch.full_like(snr, 5.0)
    eps = torch.stack([snr, gamma], dim=1).min(dim=1)[0] / snr
    v = torch.stack([snr, gamma], dim=1).min(dim=1)[0] / (snr + 1)
    torch.testing.assert_close(loss_weights(snr, "min_snr", "epsilon", 5.0), eps)
    torch.testing.assert_close(loss_weights(snr, "min_snr", "v_prediction", 5.0), v)


def test_parameterisations_weight_the_same_x0_error():
    """The three parameterisations of one weighting weight the same x0-error identically."""
    snr = torch.logspace(-3, 3, 50)
    for weighting in ("debias", "min_snr"):
        x0 = loss_weights(snr, weighting, "sample")
        torch.testing.assert_close(loss_weights(snr, weighting, "epsilon") * snr, x0)
        torch.testing.assert_close(loss_weights(snr, weighting, "v_prediction") * (snr + 1), x0)


@pytest.mark.parametrize("weighting", loss.WEIGHTINGS)
@pytest.mark.parametrize("prediction_type", loss.PREDICTION_TYPES)
def test_weights_finite_and_nonnegative_at_extremes(weighting, prediction_type):
    snr = torch.tensor([0.0, 1e-30, 1e-8, 1e8, 1e30, float("inf")])
    w = loss_weights(snr, weighting, prediction_type)
    assert torch.isfinite(w).all() and (w >= 0).all(), w


def test_debias_eps_weight_at_sdxl_schedule_ends():
    abar = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - abar, 0)
    snr = compute_snr(abar, torch.tensor([0, 999]))
    assert snr[0].item() == pytest.approx(1175.4, rel=1e-3)  # SD's t = 0
    w = loss_weights(snr, "debias", "epsilon")
    torch.testing.assert_close(w, 1 / snr.sqrt())  # both ends inside the exact range


def test_zero_terminal_snr_is_finite():
    abar = torch.tensor([0.9, 0.5, 0.0])  # zero terminal SNR: ᾱ_T = 0
    snr = compute_snr(abar, torch.tensor([0, 1, 2]))
    assert snr[2].item() == 0.0
    for pt in loss.PREDICTION_TYPES:
        assert torch.isfinite(loss_weights(snr, "debias", pt)).all()


def test_compute_snr_precision_dtype_device_shape():
    abar = torch.tensor([0.999999, 0.5, 1e-6], dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 1])
    snr = compute_snr(abar, t)
    assert snr.dtype == torch.float32 and snr.shape == (4,) and snr.device == t.device
    a = abar.double()
    want = (a / (1 - a))[t]
    torch.testing.assert_close(snr.double(), want, rtol=1e-6, atol=0)
    assert math.isinf(compute_snr(torch.tensor([1.0]), torch.tensor([0])).item())


def test_diffusion_loss_reduction_and_dtype():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([10, 500, 990])
    per = diffusion_loss(pred, target, t, abar, reduction="none")
    assert per.shape == (3,) and per.dtype == torch.float32
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = abar[t] / (1 - abar[t])
    torch.testing.assert_close(per, mse / snr.sqrt())
    torch.testing.assert_close(diffusion_loss(pred, target, t, abar), per.mean())
    const = diffusion_loss(pred, target, t, abar, weighting="constant")
    torch.testing.assert_close(const, torch.nn.functional.mse_loss(pred, target))
    # bf16 inputs: the squared error is taken in float32, not in bf16
    low = diffusion_loss(pred.bfloat16(), target.bfloat16(), t, abar, reduction="none")
    assert low.dtype == torch.float32
    exact = diffusion_loss(pred.bfloat16().float(), target.bfloat16().float(), t, abar, reduction="none")
    torch.testing.assert_close(low, exact)


def test_bad_names_raise():
    snr = torch.ones(2)
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(snr, "snr")
    with pytest.raises(ValueError, match="prediction_type"):
        loss_weights(snr, "debias", "flow")
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(2) * 0.5,
                       reduction="sum")


def test_loss_module_imports_no_diffusers():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, loss; assert not [m for m in sys.modules if m.startswith(('diffusers', 'transformers'))]"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
