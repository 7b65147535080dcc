"""Device selection from runtime.device, and the attention kernels of runtime.attention."""

from __future__ import annotations

from core.errors import ConfigError


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f'runtime.device = {name!r}, but torch sees no CUDA GPU here; use "auto" or "cpu".')
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError('runtime.device = "mps", but MPS is not available here; use "auto" or "cpu".')
    return torch.device(name)


def check_attention(name: str, device) -> None:
    """Refuse runtime.attention where it cannot run, by name, before anything is loaded: xformers needs a CUDA GPU
    and the xformers package."""
    if name == "sdpa":
        return
    if device.type != "cuda":
        raise ConfigError(
            f'runtime.attention = "{name}" runs on CUDA GPUs only, and this run is on {device.type}. Use "sdpa" '
            f"(the default: PyTorch's own fused attention, on every device)."
        )
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        raise ConfigError(
            f'runtime.attention = "{name}", but xformers is not installed here: pip install "lora-pipeline[xformers]" '
            f'(a build that matches your torch and CUDA), or use "sdpa" (the default).'
        )


def use_attention(denoiser, name: str, device) -> None:
    """Put the denoiser's attention on runtime.attention's kernels. sdpa: as loaded (diffusers' default is PyTorch's
    scaled_dot_product_attention). xformers: the transformers (Z-Image, FLUX, Qwen-Image) through diffusers'
    attention dispatcher, the UNets (SD 1.x, SDXL) through their xformers processors."""
    check_attention(name, device)
    if name == "sdpa":
        return
    dispatched = any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules())
    try:
        if dispatched:
            denoiser.set_attention_backend(name)
        else:
            denoiser.enable_xformers_memory_efficient_attention()
    except Exception as e:  # xformers' own checks: a build without this GPU's kernels, a torch it was not built for
        raise ConfigError(
            f'runtime.attention = "{name}": xformers does not run here ({type(e).__name__}: {e}). Install a build '
            f'that matches your torch and CUDA, or use "sdpa" (the default).'
        ) from None


def load_frozen(family, layout, device, weights_dtype: str, attention: str):
    """The family's denoiser for inference only (the teacher, the prior, the differential eval), in eval mode,
    computing in fp32. With weights_dtype "fp16", "bf16" or "fp8" its Linear and Conv2d weights (nearly all of its
    bytes) are stored in that dtype and cast to fp32 at each use (training/precision.store_weights_in): the model
    becomes a fixed, slightly rounded copy of itself, and its predictions and their differences stay fp32
    computations. It is loaded and narrowed on the CPU, so the accelerator never holds the fp32 model; a checkpoint
    stored in bf16/fp16 (family.stored_dtype) is loaded as stored, so the CPU never holds it either."""
    import torch

    from stages.training.precision import store_weights_in, widen_all_but_layer_weights

    narrow = weights_dtype != "fp32"
    if not narrow:
        denoiser = family.load_denoiser(layout, device).eval()
    else:  # a checkpoint stored in bf16/fp16 is loaded as stored: no fp32 copy, the same values
        denoiser = family.load_denoiser(layout, torch.device("cpu"), family.stored_dtype(layout)).eval()
        widen_all_but_layer_weights(denoiser)  # what stays fp32: all but the Linear/Conv2d weights narrowed below
        store_weights_in(denoiser, weights_dtype, torch.float32)
        denoiser.to(device)
    use_attention(denoiser, attention, device)
    return denoiser


def load_frozen_in_turn(ctx, family, layout, device, weights_dtype: str | None, wanted: bool, stage: str):
    """load_frozen for a stage (ctx: its StageContext; weights_dtype None is fp32) on every process that has rows to
    compute (wanted; None on the others), the processes of a node one after another (core/dist.in_turn): each loads
    the whole model through its CPU memory, so a node holds one such copy at a time, not one per process. Every
    process must call it."""
    from core import dist

    local = dist.local_size()
    if local > 1 and dist.is_main():
        ctx.log(
            f"{stage}: the {local} processes of this node load the model one after another, so its CPU memory holds "
            f"one copy at a time"
        )
    with dist.in_turn(dist.size() > 1):
        if not wanted:
            return None
        return load_frozen(family, layout, device, weights_dtype or "fp32", ctx.runtime.attention)
