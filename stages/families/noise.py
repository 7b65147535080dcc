"""Noise processes, built from a resolved `timesteps` dict alone (design.md §7).

A family reads its scheduler config into the base of that dict (cheap, at planning time); the user's
timestep settings resolve it further (`resolve_timesteps`); the dict is hashed into every key that depends
on it and is part of the cross-phase contract. `make_process` turns it into the object the training code
calls, so what a phase computes is exactly what its key says.

- DDPM (SD 1.x/2.x): integer t in [0, T), x_t = √ᾱ·x0 + √(1−ᾱ)·ε, target ε or v.
- Flow matching (Z-Image, FLUX.2): t is σ in [0, 1], x_t = (1−σ)·x0 + σ·ε, target v = ε − x0,
  x0 = x_t − σ·v. σ is sampled uniform, logit-normal or mode-scaled (SD3's samplers), then shifted: none,
  static (σ' = sσ / (1 + (s−1)σ)) or resolution-dependent (μ from the image sequence length, as the
  diffusers pipelines compute it; σ' = e^μ / (e^μ + 1/σ − 1)).
"""

from __future__ import annotations

import math
from typing import Any

from core.errors import ConfigError

SAMPLERS = ("uniform", "logit_normal", "mode")
SHIFTS = ("auto", "none", "static", "resolution")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def calculate_mu(seq_len: int, cfg: dict) -> float:
    """The resolution-dependent shift μ of the diffusers flow pipelines (linear in the image sequence length)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def resolve_noise(base: dict[str, Any], settings, section: str) -> dict[str, Any]:
    """The noise options of a section (NoiseSettings) that are on, checked against the process: {} when all are
    off, so a default config keeps the keys it had before they existed."""
    get = lambda name, default: getattr(settings, name, default)  # noqa: E731  (ScheduleConfig, TrainConfig, tests)
    flow = base["process"] == "flow"
    out: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    offset, adaptive = get("noise_offset", 0.0), get("adaptive_noise_scale", None)
    if adaptive is not None and not offset:
        raise ConfigError(
            f"{section}.adaptive_noise_scale scales {section}.noise_offset by the latent's mean, but noise_offset is "
            f"0. Set {section}.noise_offset too (kohya's default is 0.0357), or leave adaptive_noise_scale unset."
        )
    if offset:
        noise["offset"] = float(offset)
        if adaptive is not None:
            noise["adaptive_scale"] = float(adaptive)
    if get("multires_noise_iterations", 0):
        noise["multires"] = {
            "iterations": int(get("multires_noise_iterations", 0)),
            "discount": float(get("multires_noise_discount", 0.3)),
        }
    if get("ip_noise_gamma", 0.0):
        noise["ip_gamma"] = float(get("ip_noise_gamma", 0.0))
    if noise:
        out["noise"] = noise
    lo, hi = get("min_timestep", None), get("max_timestep", None)
    if lo is not None or hi is not None:
        total = base.get("num_train_timesteps", 1000)
        lo, hi = lo or 0, total if hi is None else hi
        if not 0 <= lo < hi <= total:
            raise ConfigError(
                f"{section}.min_timestep / max_timestep = {lo} / {hi}: need 0 <= min < max <= {total} (the model's "
                f"num_train_timesteps)."
            )
        out["timestep_range"] = [int(lo), int(hi)]
    if get("zero_terminal_snr", False):
        if flow:
            raise ConfigError(
                f"{section}.zero_terminal_snr rescales a DDPM beta schedule; this model is trained by flow matching, "
                f"whose sigma already reaches 1 (pure noise). Leave it off."
            )
        out["rescale_betas_zero_snr"] = True
    return out


def resolve_timesteps(base: dict[str, Any], settings, seq_len: int, section: str) -> dict[str, Any]:
    """The family's process (from its scheduler config) plus the user's sampler, shift and noise options, with every
    `auto` resolved. `settings` has timestep_sampling, logit_mean, logit_std, mode_scale, timestep_shift, shift
    (and the NoiseSettings fields, where the section has them)."""
    out = {**base, **resolve_noise(base, settings, section)}
    sampler, shift_kind = settings.timestep_sampling, settings.timestep_shift
    if base["process"] == "ddpm":
        if sampler != "uniform":
            raise ConfigError(
                f'{section}.timestep_sampling = "{sampler}" is a flow-matching sampler; this model has a DDPM noise '
                f'process, which samples integer timesteps uniformly. Use "uniform".'
            )
        if shift_kind not in ("auto", "none") or settings.shift is not None:
            raise ConfigError(
                f"{section}.timestep_shift / {section}.shift apply to flow-matching models; this model has a DDPM "
                f'noise process. Leave them unset ("auto").'
            )
        return {**out, "sampler": "uniform"}
    out["sampler"] = {"name": sampler}
    if sampler == "logit_normal":
        out["sampler"].update(mean=settings.logit_mean, std=settings.logit_std)
    elif sampler == "mode":
        out["sampler"]["scale"] = settings.mode_scale
    cfg = base.get("scheduler", {})
    if shift_kind == "auto":
        if settings.shift is not None:
            shift_kind = "static"
        elif cfg.get("use_dynamic_shifting"):
            shift_kind = "resolution"
        else:
            shift_kind = "static" if cfg.get("shift", 1.0) != 1.0 else "none"
    if shift_kind == "none":
        out["shift"] = {"kind": "none"}
    elif shift_kind == "static":
        value = settings.shift if settings.shift is not None else cfg.get("shift", 1.0)
        out["shift"] = {"kind": "static", "value": float(value)}
    else:
        out["shift"] = {"kind": "resolution", "seq_len": seq_len, "mu": calculate_mu(seq_len, cfg)}
    return out


def check_weighting(timesteps: dict[str, Any], weighting: str, section: str) -> str:
    if weighting != "none" and timesteps["process"] != "flow":
        raise ConfigError(
            f'{section}.loss_weighting = "{weighting}" weights the loss over the flow-matching noise level; this model '
            f'has a DDPM noise process. Use "none".'
        )
    return weighting


def make_process(timesteps: dict[str, Any], prediction_type: str):
    if timesteps["process"] == "ddpm":
        return DDPMProcess(timesteps, prediction_type)
    if timesteps["process"] == "flow":
        return FlowMatchProcess(timesteps)
    raise ValueError(f"unknown noise process {timesteps['process']!r}")


def loss_weights(process, t, weighting: str):
    """Per-sample loss weights (None: plain mean). sigma_sqrt and cosmap are SD3's flow-matching weightings."""
    if weighting == "none":
        return None
    if process.kind != "flow":
        raise ConfigError(f'loss_weighting = "{weighting}" applies to flow-matching models only; use "none".')
    sigma = t.float()
    if weighting == "sigma_sqrt":
        return (sigma**-2.0).clamp(max=1e4)
    return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


class DDPMProcess:
    """The DDPM forward process and training target, from the model's own scheduler config."""

    kind = "ddpm"

    def __init__(self, timesteps: dict, prediction_type: str):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(
            num_train_timesteps=timesteps["num_train_timesteps"],
            beta_schedule=timesteps["beta_schedule"],
            beta_start=timesteps["beta_start"],
            beta_end=timesteps["beta_end"],
            prediction_type=prediction_type,
            rescale_betas_zero_snr=timesteps.get("rescale_betas_zero_snr", False),
        )
        self.prediction_type = prediction_type
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.range = tuple(timesteps.get("timestep_range", (0, self.num_timesteps)))
        self.noise_options = timesteps.get("noise", {})  # training_noise() applies them

    def sample_timesteps(self, n: int, generator):
        import torch

        return torch.randint(self.range[0], self.range[1], (n,), generator=generator)

    def as_tensor(self, values: list):
        import torch

        return torch.tensor(values, dtype=torch.long)

    def bin_of(self, t) -> float:
        """Where a timestep sits in [0, 1) (for histograms)."""
        return float(t) / self.num_timesteps

    def noisy_input(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)

    def predict_x0(self, x_t, pred, t):
        """The clean latent a prediction implies (what a one-step sampler would return)."""
        ab = self.scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, *([1] * (x_t.ndim - 1)))
        if self.prediction_type == "epsilon":
            return (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
        return ab.sqrt() * x_t - (1 - ab).sqrt() * pred


class FlowMatchProcess:
    """Rectified flow: t is σ in [0, 1] (float32), the model predicts v = ε − x0."""

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, timesteps: dict):
        self.sampler = timesteps["sampler"]
        self.shift = timesteps["shift"]
        self.num_timesteps = timesteps.get("num_train_timesteps", 1000)
        self.range = timesteps.get("timestep_range")
        self.noise_options = timesteps.get("noise", {})  # training_noise() applies them

    def _shifted(self, u):
        import torch

        kind = self.shift["kind"]
        if kind == "static":
            s = self.shift["value"]
            return s * u / (1 + (s - 1) * u)
        if kind == "resolution":
            e = math.exp(self.shift["mu"])
            return torch.where(u > 0, e / (e + (1 / u.clamp_min(1e-12) - 1)), torch.zeros_like(u))
        return u

    def sample_timesteps(self, n: int, generator):
        import torch

        name = self.sampler["name"]
        if name == "logit_normal":
            z = torch.randn(n, generator=generator) * self.sampler["std"] + self.sampler["mean"]
            u = torch.sigmoid(z)
        else:
            u = torch.rand(n, generator=generator)
            if name == "mode":
                u = 1 - u - self.sampler["scale"] * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        sigma = self._shifted(u.clamp(0.0, 1.0))
        if self.range is not None:  # [min_timestep, max_timestep) of T, as a range of σ
            lo, hi = self.range[0] / self.num_timesteps, self.range[1] / self.num_timesteps
            sigma = lo + (hi - lo) * sigma
        return sigma.to(torch.float32)

    def as_tensor(self, values: list):
        import torch

        return torch.tensor(values, dtype=torch.float32)

    def bin_of(self, t) -> float:
        return min(float(t), 1.0 - 1e-9)

    @staticmethod
    def _col(t, like):
        return t.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def noisy_input(self, x0, noise, t):
        s = self._col(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def predict_x0(self, x_t, pred, t):
        return x_t - self._col(t, x_t) * pred


def pyramid_noise(noise, iterations: int, discount: float, generator):
    """Multi-resolution (pyramid) noise: noise plus `iterations` levels of upsampled coarser noise, level i at a
    random scale factor r_i in [2, 4) per level and weight discount^i, then renormalized to unit std per sample.
    kohya draws r from Python's unseeded `random` and divides by the whole batch's std; here both come from the
    micro-step's generator and each sample is normalized on its own, so a resumed run draws the same noise."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.flatten(1).std(dim=1).view(b, 1, 1, 1)


def training_noise(options: dict, x0, noise, generator):
    """(the noise the target is built from, the noise x_t is built from) for one micro-batch: kohya's order —
    noise offset (adaptive: offset + scale·|mean of the latent| per sample and channel, floored at 0), then pyramid
    noise, then input perturbation (ip_noise_gamma, input only). Extra draws come from `generator` after the base
    noise and the timesteps, so a run with every option off draws exactly what it drew before they existed."""
    if not options:
        return noise, noise
    import torch

    b, c = noise.shape[:2]
    if "offset" in options:
        offset = torch.full((b, c, 1, 1), options["offset"])
        if "adaptive_scale" in options:
            mean = x0.float().mean(dim=tuple(range(2, x0.ndim)), keepdim=True).abs().view(b, c, 1, 1)
            offset = (offset + options["adaptive_scale"] * mean).clamp_min(0.0)
        shape = (b, c) + (1,) * (noise.ndim - 2)
        noise = noise + offset.view(shape) * torch.randn(shape, generator=generator)
    if "multires" in options:
        m = options["multires"]
        noise = pyramid_noise(noise, m["iterations"], m["discount"], generator)
    noise_in = noise
    if "ip_gamma" in options:
        noise_in = noise + options["ip_gamma"] * torch.randn(noise.shape, generator=generator)
    return noise, noise_in
