"""Precision of the frozen base model: which dtype it computes in (mixed_precision), how its weights are stored
(bf16/fp16 as computed, fp8 or narrower-than-computed through a cast at each use), and how a checkpoint stored in
bf16/fp16 is loaded as stored with the layers adapters start from widened back to fp32.
"""

from __future__ import annotations

from core.errors import ConfigError, PipelineError


def check_precision(mixed_precision: str, device, fp8_base: bool = False, section: str = "lora1") -> None:
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f'{section}.mixed_precision = "fp16" needs a CUDA GPU, but this run is on {device.type}. Use "bf16" or '
            f'"no".'
        )
    if fp8_base and device.type != "cuda":
        raise ConfigError(
            f"{section}.fp8_base = true stores the frozen base weights in float8 to save GPU memory; this run is on "
            f"{device.type}, where it saves nothing worth its rounding and runs slower. Set it to false, or run on a "
            f"CUDA GPU (runtime.device)."
        )


def store_base_in_fp8(denoiser, compute_dtype) -> int:
    """Keep every frozen Linear/Conv2d weight of the denoiser (not the adapter's) in float8_e4m3fn and cast it to
    compute_dtype at each use (a parametrization: the product runs in compute_dtype, the LoRA stays fp32). Weights
    are scaled per output channel into fp8's range first, so small weights keep their precision. -> how many."""
    return store_weights_in(denoiser, "fp8", compute_dtype)


def store_weights_in(denoiser, storage: str, compute_dtype) -> int:
    """Keep every frozen Linear/Conv2d weight of the denoiser (not an adapter's) in storage ("fp8": float8_e4m3fn
    scaled per output channel into its range; "bf16"; "fp16") and cast it to compute_dtype at each use, through a
    parametrization: the layer computes in compute_dtype from a rounded copy of its weight. -> how many."""
    import torch
    from torch.nn.utils import parametrize

    class StoredWeight(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.register_buffer("scale", scale)

        def forward(self, stored):
            if self.scale is None:
                return stored.to(compute_dtype)
            return stored.to(compute_dtype) * self.scale.to(compute_dtype)

    dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16}[storage]
    count = 0
    for name, module in list(denoiser.named_modules()):
        if not _is_layer(module) or module.weight.requires_grad:
            continue
        if any(part in name.split(".") for part in ("lora_A", "lora_B", "lora_magnitude_vector")):
            continue
        w = module.weight.detach().float()
        scale = None
        if storage == "fp8":
            amax = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12)
            scale = (amax / torch.finfo(dtype).max).reshape(w.shape[0], *[1] * (w.dim() - 1))
            w = w / scale
        stored = w.to(dtype)
        if storage == "fp16" and not torch.isfinite(stored).all():
            raise PipelineError(
                f"{name}: a weight is beyond fp16's range (max |w| {w.abs().max().item():.3g} > 65504); store the "
                f'weights in bf16 (transfer.weights_dtype = "bf16").'
            )
        module.weight = torch.nn.Parameter(stored, requires_grad=False)
        parametrize.register_parametrization(module, "weight", StoredWeight(scale), unsafe=True)
        count += 1
    return count


def compute_dtype(mixed_precision: str):
    """The torch dtype a section's mixed_precision computes (and stores the frozen base) in; None for "no"."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def store_base_in(denoiser, dtype) -> int:
    """Store every frozen parameter of the denoiser (the base model, a frozen LoRA-1 adapter) in dtype; the trained
    adapter stays fp32, and buffers (position tables, frequencies) stay as they are. -> how many were cast."""
    count = 0
    for param in denoiser.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def widen_for(denoiser, cfg, targets, init: str, preset_lora, kohya_prefix: str, everything_else: bool = False) -> int:
    """After a load in the checkpoint's own bf16/fp16 (family.stored_dtype): the layers that adapters start from back
    in fp32, the section's targets (by peft's own matching) and a preset LoRA-1's modules, so PiSSA/OLoRA, DoRA's
    norms and a merged LoRA-1 compute from the fp32 weights an fp32 load gives (each value came from the narrower
    dtype, so widening it is exact). The rest stays narrow until store_base_in (or store_base_in_fp8), whose cast of
    it is then exact too; with everything_else (fp8_base, which keeps them fp32) every parameter but the other
    Linear/Conv2d weights is widened as well. -> how many parameters were widened."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from stages.training.lora_files import match_modules
    from stages.training.networks import adapter_config

    config = adapter_config(
        getattr(cfg, "network", "lora"),
        cfg.rank,
        cfg.alpha,
        cfg.dropout,
        targets,
        getattr(cfg, "rslora", False),
        init,
        -1 if getattr(cfg, "lokr_factor", None) is None else cfg.lokr_factor,
    )
    preset = set(match_modules(preset_lora, denoiser, kohya_prefix)) if preset_lora is not None else set()
    count = _widen(
        denoiser,
        lambda name, module, _: name in preset or (_is_layer(module) and check_target_module_exists(config, name)),
    )
    return count + (widen_all_but_layer_weights(denoiser) if everything_else else 0)


def widen_all_but_layer_weights(denoiser) -> int:
    """Every parameter but the Linear/Conv2d weights back in fp32 (norms, biases, embeddings): what fp8_base and the
    teacher's narrow weights (devices.load_frozen) keep wide. -> how many were widened."""
    return _widen(denoiser, lambda _, module, pname: not (_is_layer(module) and pname == "weight"))


def _is_layer(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def _widen(denoiser, chosen) -> int:
    """Each floating parameter that chosen(module name, module, parameter name) picks, in fp32 (exact for a value
    that came from bf16/fp16). -> how many were not fp32 already."""
    import torch

    count = 0
    for name, module in denoiser.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32 and chosen(name, module, pname):
                param.data = param.data.float()
                count += 1
    return count
