"""The training loss: l2 / l1 / huber / smooth_l1 with a huber schedule, and the per-sample weightings over the
noise level (flow: sigma_sqrt, cosmap; DDPM: min-SNR-γ, debiased estimation).

`resolve_loss` turns a training section into the `loss` dict of its key, refusing at planning time an option that
means nothing for the model's noise process; `training_loss` computes the loss of one micro-batch from that dict.
Formulas follow kohya sd-scripts (library/train_util.py, custom_train_functions.py), with the quirks listed in
docs/training.md fixed on purpose.
"""

from __future__ import annotations

import math

from core.errors import ConfigError

LOSSES = ("l2", "l1", "huber", "smooth_l1")


def resolve_loss(section, timesteps: dict, prediction_type: str, name: str) -> dict:
    """The loss settings that change what a stage trains, checked against the noise process. Only what is on
    goes into the dict, so every option left at its default leaves it {"type": "l2"}."""
    kind = getattr(section, "loss", "l2")
    out: dict = {"type": kind}
    if kind in ("huber", "smooth_l1"):
        out["huber"] = {"schedule": section.huber_schedule, "c": section.huber_c, "scale": section.huber_scale}
    process = timesteps["process"]
    gamma, debiased = getattr(section, "min_snr_gamma", None), getattr(section, "debiased_estimation", False)
    if process == "flow":
        for field, on in (("min_snr_gamma", gamma is not None), ("debiased_estimation", debiased)):
            if on:
                raise ConfigError(
                    f"{name}.{field} weights the loss by the SNR of a DDPM noise process; this model is trained by "
                    f"flow matching, where {name}.loss_weighting (sigma_sqrt, cosmap) is the weighting to use."
                )
        return out
    if gamma is not None:
        out["min_snr_gamma"] = float(gamma)
    if debiased:
        if prediction_type == "epsilon" and timesteps.get("rescale_betas_zero_snr"):
            raise ConfigError(
                f"{name}.debiased_estimation weights epsilon-prediction by 1/sqrt(SNR), which is infinite at the last "
                f"timestep with zero terminal SNR. Use v-prediction, or leave one of them off."
            )
        out["debiased_estimation"] = True
    return out


def snr(process, t):
    """Signal-to-noise ratio of each sample's noise level: ᾱ/(1−ᾱ) (DDPM, after any zero-terminal rescale);
    ((1−σ)/σ)² (flow)."""
    import torch

    if process.kind == "flow":
        s = t.float()
        return ((1 - s) / s) ** 2
    ab = process.scheduler.alphas_cumprod.to(t.device)[t].float()
    return ab / (1 - ab).clamp_min(torch.finfo(torch.float32).tiny)


def huber_c(loss: dict, process, t):
    """Per-sample c of huber/smooth_l1. DDPM follows kohya (t in [0, T)); flow uses σ in place of t/T, and 1/√SNR =
    σ/(1−σ) in the snr schedule, which then reads (1−c)(1−σ)² + c. Every schedule is scaled by huber_scale (kohya's
    snr schedule ignores it)."""
    import torch

    h = loss["huber"]
    c, scale = h["c"], h["scale"]
    n = t.shape[0]
    if h["schedule"] == "constant":
        return torch.full((n,), c * scale)
    if process.kind == "flow":
        s = t.float()
        if h["schedule"] == "exponential":
            return torch.exp(math.log(c) * s) * scale
        return ((1 - c) * (1 - s) ** 2 + c) * scale
    if h["schedule"] == "exponential":
        return torch.exp(math.log(c) * t.float() / process.num_timesteps) * scale
    noise_to_signal = snr(process, t).rsqrt()
    return ((1 - c) / (1 + noise_to_signal) ** 2 + c) * scale


def elementwise(pred, target, loss: dict, c=None):
    import torch.nn.functional as F

    kind = loss["type"]
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
    smooth = ((pred - target) ** 2 + c**2).sqrt() - c
    return 2 * c * smooth if kind == "huber" else 2 * smooth


def snr_weights(loss: dict, process, t):
    """Per-sample DDPM weights (None when off): min-SNR-γ, min(SNR,γ)/SNR for ε (1 where SNR = 0, its limit; kohya
    divides 0 by 0) and min(SNR,γ)/(SNR+1) for v; debiased estimation 1/√SNR for ε and 1/(SNR+1) for v, SNR capped
    at 1000. Both multiply when both are on."""
    import torch

    gamma, debiased = loss.get("min_snr_gamma"), loss.get("debiased_estimation", False)
    if gamma is None and not debiased:
        return None
    s = snr(process, t)
    v = process.prediction_type == "v_prediction"
    w = torch.ones_like(s)
    if gamma is not None:
        clipped = torch.minimum(s, torch.full_like(s, gamma))
        w = w * (clipped / (s + 1) if v else torch.where(s > 0, clipped / s.clamp_min(1e-30), torch.ones_like(s)))
    if debiased:
        capped = s.clamp(max=1000.0)
        w = w * (1 / (capped + 1) if v else capped.rsqrt())
    return w


def training_loss(pred, target, t, process, loss: dict | None, weighting: str, mask=None, sample_w=None):
    """The loss of one micro-batch (a scalar). l2 without weights or mask is F.mse_loss exactly (the bytes of every
    earlier run); per-sample losses are means over each sample's elements, or with a (B, 1, h, w) mask (data.
    alpha_mask) the mask-weighted mean Σ m·l / Σ m over each sample's elements. sample_w (B,) multiplies each
    sample's loss before the batch mean (regularization images: kohya's loss_weights)."""
    import torch.nn.functional as F

    from stages.families.noise import loss_weights

    loss = loss or {"type": "l2"}
    pred, target = pred.float(), target.float()
    flow_w = loss_weights(process, t, weighting)
    ddpm_w = snr_weights(loss, process, t)
    if loss["type"] == "l2" and flow_w is None and ddpm_w is None and mask is None and sample_w is None:
        return F.mse_loss(pred, target)
    c = huber_c(loss, process, t) if loss["type"] in ("huber", "smooth_l1") else None
    per_element = elementwise(pred, target, loss, c)
    if mask is None:
        per_sample = per_element.flatten(1).mean(1)
    else:
        m = mask.float().expand_as(per_element)
        per_sample = (per_element * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    if sample_w is not None:
        per_sample = per_sample * sample_w.to(per_sample.device)
    if flow_w is not None:  # normalized so that the weights' mean is 1 (SD3's scripts)
        flow_w = flow_w.to(per_sample.device)
        return (per_sample * flow_w).sum() / flow_w.sum()
    if ddpm_w is not None:  # not normalized, as in the Min-SNR paper and kohya
        return (per_sample * ddpm_w.to(per_sample.device)).mean()
    return per_sample.mean()
