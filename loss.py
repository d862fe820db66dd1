"""Per-timestep loss weighting for diffusion training: debiased estimation, min-SNR and constant.

Pure torch, no diffusers import: copy this file into your own trainer.

Notation (DDPM / "variance preserving"): x_t = α x₀ + σ ε with α² = ᾱ_t, σ² = 1 − ᾱ_t, and
SNR(t) = α²/σ² = ᾱ_t / (1 − ᾱ_t).

Every parameterisation's MSE is a multiple of the x₀-MSE:
- ε-prediction: x̂₀ = (x_t − σ ε̂)/α, so x̂₀ − x₀ = −(σ/α)(ε̂ − ε) and ‖ε̂ − ε‖² = SNR · ‖x̂₀ − x₀‖².
- v-prediction: v = α ε − σ x₀ and x̂₀ = α x_t − σ v̂, so x̂₀ − x₀ = −σ (v̂ − v) and
  ‖v̂ − v‖² = ‖x̂₀ − x₀‖² / σ² = (SNR + 1) · ‖x̂₀ − x₀‖².
- sample (x₀) prediction: the x₀-MSE itself.

So a weighting is defined once, as a weight on the x₀-MSE, and divided by SNR (ε) or SNR + 1 (v):

| weighting | x₀-weight   | ε-prediction      | v-prediction         | sample       |
|-----------|-------------|-------------------|----------------------|--------------|
| debias    | √SNR        | 1/√SNR            | √SNR/(SNR+1)         | √SNR         |
| min_snr   | min(SNR, γ) | min(SNR, γ)/SNR   | min(SNR, γ)/(SNR+1)  | min(SNR, γ)  |
| constant  | (1 in every parameterisation: plain MSE of whatever the model predicts)          |

debias: "Debias the Training of Diffusion Models", Yu et al. 2023, arXiv:2310.08442. A constant ε-loss weights
x₀-errors by SNR, i.e. almost nothing at high t (low SNR); the paper weights the ε-loss by 1/√SNR instead.
min_snr: "Efficient Diffusion Training via Min-SNR Weighting Strategy", Hang et al. 2023, arXiv:2303.09556
(diffusers' --snr_gamma).

Clamp: SNR is clamped to [SNR_MIN, SNR_MAX] = [1e-4, 1e4] before weighting. Real schedules leave that range
only near the two ends: SNR → 0 as t → T with zero-terminal-SNR schedules (SDXL's rescaled: the last ~20
timesteps), and SNR → ∞ where ᾱ rounds to 1. Without the clamp, ε-debias (1/√SNR) and sample-debias (√SNR)
become infinite there, and the v-prediction ratios become ∞/∞. With it, every weight is finite and > 0 (the
debias weights are at most 100), and weights are exact wherever 1e-4 ≤ SNR ≤ 1e4, which covers every timestep
of SD/SDXL's own schedule (SNR from 0.0047 at t = 999 to ≈ 1175 at t = 0).
"""
import torch

SNR_MIN = 1e-4
SNR_MAX = 1e4
WEIGHTINGS = ("debias", "min_snr", "constant")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def compute_snr(alphas_cumprod, timesteps):
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for each timestep, as float32 [B] on the device of `timesteps`.

    Computed in float64 (float32 on devices without it, e.g. MPS) so 1 − ᾱ does not cancel to 0 at small t.
    ᾱ = 1 gives +inf and ᾱ = 0 gives 0; `loss_weights` handles both.
    """
    device = timesteps.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    abar = alphas_cumprod.to(device=device, dtype=dtype)[timesteps.long()]
    return (abar / (1.0 - abar)).float()


def loss_weights(snr, weighting="debias", prediction_type="epsilon", snr_gamma=5.0):
    """Weight [B] for each sample's MSE, given its SNR [B]. See the module docstring for the derivation."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    snr = snr.float().clamp(SNR_MIN, SNR_MAX)
    if weighting == "constant":
        return torch.ones_like(snr)
    x0_weight = snr.sqrt() if weighting == "debias" else snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        return x0_weight / snr  # ε-MSE = SNR · x₀-MSE
    if prediction_type == "v_prediction":
        return x0_weight / (snr + 1.0)  # v-MSE = (SNR + 1) · x₀-MSE
    return x0_weight  # sample: the x₀-MSE itself


def mean_weight(alphas_cumprod, weighting="debias", prediction_type="epsilon", snr_gamma=5.0, t_min=0, t_max=None):
    """E_t[w(t)] for t uniform in [t_min, t_max): divide the loss by it to keep plain MSE's scale.

    Weighting changes the loss's magnitude, and with it the meaning of the learning rate and of gradient
    clipping. For SDXL's schedule, ε-debias has mean 1/√SNR ≈ 3.0, with 66% of the weight mass at t ≥ 750;
    dividing by the mean keeps the relative emphasis over t and restores the loss scale of constant weighting.
    """
    t = torch.arange(t_min, len(alphas_cumprod) if t_max is None else t_max)
    return loss_weights(compute_snr(alphas_cumprod, t), weighting, prediction_type, snr_gamma).mean()


def per_sample_mse(model_pred, target):
    """Mean squared error over every non-batch dimension, in float32 whatever the inputs' dtype: [B]."""
    err = model_pred.float() - target.float()
    return err.pow(2).flatten(1).mean(dim=1)


def diffusion_loss(model_pred, target, timesteps, alphas_cumprod, weighting="debias", prediction_type="epsilon",
                   snr_gamma=5.0, reduction="mean"):
    """Weighted diffusion loss: per-sample MSE × loss_weights(SNR(t)), averaged over the batch.

    `target` must already be the target of `prediction_type` (ε, v or x₀). reduction="none" returns [B].
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    snr = compute_snr(alphas_cumprod, timesteps)
    loss = per_sample_mse(model_pred, target) * loss_weights(snr, weighting, prediction_type, snr_gamma)
    return loss.mean() if reduction == "mean" else loss
